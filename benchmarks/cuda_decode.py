"""ctc's TVM CUDA backend against PyTorch on one GPU: decode steps, prefill and generation.

Two phases, because the GPU machine has no TVM compiler and no registry:

* ``build OUT`` (any machine with nvcc; no GPU needed) captures each model shape with ctc,
  compresses it (int4 weight-only RTN through ctc's ``quantize`` pass where asked), compiles it
  for ``target cuda`` and writes ``OUT/<name>/{model.so, model.json}`` plus ``OUT/manifest.json``.
  No weights are written: every bound weight records how it derives from module parameters.
* ``run OUT`` (the GPU machine: torch with CUDA, ``tvm_ffi``, TVM's runtime libraries via
  ``$CTC_TVM_LIBDIR``) makes each model's weights from a fixed seed *on the GPU machine*
  (``LlamaForCausalLM`` initialised with ``torch.manual_seed``; int4 weights quantized there with
  ctc's own quantizer), binds them to the library, checks the logits against an fp32 PyTorch
  reference on the same weights and caches, and times:
  ctc (Relax VM launching each kernel, and the whole step or prefill replayed as one CUDA graph) against
  PyTorch eager, ``torch.compile`` (default) and ``torch.compile(mode="reduce-overhead")`` with
  Hugging Face's ``StaticCache``; prefill of 512 tokens; a 128-token greedy generation; the
  weight bytes streamed per step over the device copy bandwidth measured in the same run.

Random weights are used for timing because the real SmolLM2 weights (98 MB as GGUF, 269 MB in
fp16) do not fit one call's 64 MiB carry; the shapes are the real ones.  Accuracy on the real
SmolLM2 weights goes through the same lowering on the CPU target (``tests``, ``ctc eval``).

Protocol: every latency is the median of ``--repeat`` CUDA-event timings of single calls after
warm-up (``per call``), and ``back-to-back`` = wall time of ``--repeat`` consecutive calls / n.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SEED = 0

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192),
    # Llama-3.2-1B (rope scaling left out: it changes no shape and no cost)
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}

MAX_LEN = 1088  # cache buffers: positions 128 and 1024 are timed in the same library

# name -> (shape, kind, batch, weights)
ARTIFACTS: dict[str, tuple[str, str, int, str]] = {
    "smollm2_f16_decode": ("smollm2", "decode", 1, "f16"),
    "smollm2_i4_decode": ("smollm2", "decode", 1, "i4"),
    "llama1b_f16_decode_b1": ("llama1b", "decode", 1, "f16"),
    "llama1b_i4_decode_b1": ("llama1b", "decode", 1, "i4"),
    "llama1b_i4_decode_b1_kernels": ("llama1b", "decode", 1, "i4"),
    "llama1b_f16_decode_b8": ("llama1b", "decode", 8, "f16"),
    "llama1b_i4_decode_b8": ("llama1b", "decode", 8, "i4"),
    "llama1b_f16_prefill512": ("llama1b", "prefill", 1, "f16"),
    "llama1b_i4_prefill512": ("llama1b", "prefill", 1, "i4"),
}
PREFILL = 512
# target options of an artifact beyond the arch: the same int4 step through the per-operator kernels (the persistent
# decode step off), to compare with the persistent one (docs/tvm-cuda-backend.md)
BUILD_OPTIONS: dict[str, dict[str, Any]] = {"llama1b_i4_decode_b1_kernels": {"persistent": False}}
INT4 = {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 128, "sym": True, "blocks_only": False}


def _config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")


# ============================================================================ build (no GPU)
def _empty_model(shape: str) -> Any:
    """The model's structure with zero weights (made fast; the GPU machine binds seeded weights)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_config(shape))
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied head its own tensor: tie it again (one parameter, as loaded)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.original_inv_freq
                                              if hasattr(model.model.rotary_emb, "original_inv_freq") else 0.0)
    return model.eval().to(torch.float16)


def build(out: Path, names: list[str], arch: str) -> None:
    import torch

    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import BuildOptions, compile_module
    from ctc.frontends import capture
    from ctc.frontends.decode import static_decode_inputs, static_decode_step
    from ctc.passes.manager import PassManager
    from ctc.passes.quantize import QuantizeOptions, QuantizePass

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"max_len": MAX_LEN, "prefill": PREFILL, "arch": arch, "artifacts": {}}
    models: dict[str, Any] = {}
    for name in names:
        shape, kind, batch, weights = ARTIFACTS[name]
        t0 = time.perf_counter()
        model = models.setdefault(shape, _empty_model(shape))
        if kind == "decode":
            step = static_decode_step(model)
            ins = static_decode_inputs(model, MAX_LEN, position=5, batch=batch, dtype=torch.float16,
                                       random_cache=False)
            m = capture(step, ins, dynamic=False)
            prefix = "model."
        else:
            from ctc.frontends.hf import capture_hf_model

            m = capture_hf_model(model, task="causal_lm", batch=batch, seq_len=PREFILL, dynamic=False)
            ins = {"input_ids": torch.zeros(batch, PREFILL, dtype=torch.long),
                   "attention_mask": torch.ones(batch, PREFILL, dtype=torch.long)}
            prefix = ""
        if weights == "i4":
            m, _ = PassManager([QuantizePass(QuantizeOptions(**INT4))], calibration=[ins], fidelity=False,
                               progress=False).run(m)
        info = T.resolve("cuda", type("Opts", (), {"arch": arch, **BUILD_OPTIONS.get(name, {})})())
        comp = compile_module(m, target=info, options=BuildOptions(params="input"))
        comp.export(out / name, weights="derived")
        manifest["artifacts"][name] = {
            "shape": shape, "kind": kind, "batch": batch, "weights": weights, "prefix": prefix,
            "inputs": [v.name for v in m.inputs], "kernels_per_call": comp.meta["kernels_per_call"],
            "build_s": round(time.perf_counter() - t0, 1), "timings": comp.timings, "notes": comp.meta["notes"],
            "target_options": BUILD_OPTIONS.get(name, {})}
        print(f"built {name}: {comp.meta['kernels_per_call']} kernels per call, "
              f"{time.perf_counter() - t0:.0f} s; {'; '.join(comp.meta['notes']) or 'no notes'}", flush=True)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ============================================================================ run (GPU machine)
def _events_ms(fn: Any, repeat: int, warmup: int = 5) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    b2b = (time.perf_counter() - t0) * 1e3 / repeat
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
            "back_to_back_ms": round(b2b, 4)}


def kernel_profile(fn: Any, steps: int = 20, top: int = 12) -> dict[str, Any]:
    """Kernels one call launches (CUPTI through torch.profiler): count, summed device time per call, and the
    ``top`` kernels by time.  Device time / call time says how much of a step is launch gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, e.count / steps, t / steps))
    rows.sort(key=lambda r: -r[2])
    return {"kernels_per_call": round(sum(r[1] for r in rows), 1),
            "device_us_per_call": round(sum(r[2] for r in rows), 1),
            "top": [{"kernel": k[:90], "per_call": round(c, 1), "us_per_call": round(t, 2)} for k, c, t in rows[:top]]}


def copy_bandwidth() -> float:
    """Device-to-device copy rate in TB/s, bytes read + written (median of 20 copies of 2 GiB)."""
    import torch

    n = 1 << 30
    bufs = [torch.empty(n, dtype=torch.float16, device="cuda").normal_(), torch.empty(n, dtype=torch.float16,
                                                                                       device="cuda")]
    t = _events_ms(lambda: bufs[1].copy_(bufs[0]), 20)["median_ms"]
    bufs.clear()
    return 2 * 2 * n / (t * 1e-3) / 1e12


_MODELS: dict[tuple[str, Any], Any] = {}  # the seeded models of the shape run last (its artifacts share them)
_QUANT: dict[tuple[int, str], Any] = {}  # ctc's int4 of their weights, by (id(model), weight)


def _seeded_model(shape: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    if any(s != shape for s, _ in _MODELS):
        _MODELS.clear()
        _QUANT.clear()
    if (shape, dtype) not in _MODELS:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(_config(shape)).eval()
        _MODELS[shape, dtype] = model.to(device="cuda", dtype=dtype)
    return _MODELS[shape, dtype]


def _ir_params(entry: dict[str, Any], model: Any, specs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict]:
    """Module parameters by ctc name, from the seeded HF model (int4 ones quantized with ctc's quantizer),
    and the quantized weights by HF weight name."""
    from ctc.passes.quantize import quantize_weight_rtn

    prefix = entry["prefix"]
    hf = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    head = model.get_output_embeddings()
    if head is not None:  # a tied head is not always listed under its own name
        hf.setdefault("lm_head.weight", head.weight)
    wanted = sorted({n for s in specs for n in s["source"]["from"]})
    out: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    for name in wanted:
        base, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "w_scale", "w_zero"):
            if base not in quant:
                w = hf[base[len(prefix):] + ".weight"]
                key = (id(model), base)
                if key not in _QUANT:
                    _QUANT[key] = quantize_weight_rtn(w.float().cpu(), INT4["w_bits"], INT4["w_granularity"],
                                                      INT4["group_size"], INT4["sym"])
                quant[base] = _QUANT[key]
            qw = quant[base]
            out[name] = {"qweight": qw.qweight, "w_scale": qw.scale.float(), "w_zero": qw.zero}[leaf]
        else:
            out[name] = hf[name[len(prefix):]].detach()
    return out, {base[len(prefix):] + ".weight": q for base, q in quant.items()}


def _dequantized(model32: Any, quant: dict[str, Any]) -> Any:
    """A copy of the fp32 model whose quantized linears hold their dequantized weights: the reference
    semantics of the compressed module (int4 rows are checked against it, not the original)."""
    import copy

    import torch

    from ctc.ir import quant as Q

    m = copy.deepcopy(model32)
    device = next(m.parameters()).device
    for name, qw in quant.items():  # a new Parameter: a quantized tied head no longer changes the embedding
        w = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, qw.k)
        owner, _, attr = name.rpartition(".")
        setattr(m.get_submodule(owner), attr, torch.nn.Parameter(w.to(device, torch.float32), requires_grad=False))
    return m


class CtcDecoder:
    """A loaded ctc library with seeded weights bound and device-resident inputs."""

    def __init__(self, path: Path, entry: dict[str, Any], hf_model: Any):
        from ctc.backends.tvm.build import load_compiled

        self.compiled = load_compiled(path, bind_weights=False)
        params, self.quant = _ir_params(entry, hf_model, self.compiled.meta["params"])
        self.compiled.bind_module_params(params)
        self.weight_bytes = self.compiled.weight_bytes

    def bind_inputs(self, inputs: dict[str, Any]) -> None:
        self.bufs = [self.compiled.device_tensor(inputs[n]) for n in self.compiled.input_names]
        self.args = [b[0] for b in self.bufs]

    def step(self) -> list[Any]:
        return self.compiled.call_device(self.args)

    def graph(self) -> tuple[Any, list[Any]]:
        """The step captured as one CUDA graph (fixed buffers): ``(graph, outputs)``."""
        import torch
        import tvm_ffi

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), tvm_ffi.use_torch_stream():
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), tvm_ffi.use_torch_stream():
            outs = self.step()
        return g, outs


def _reference_logits(model32: Any, inputs: dict[str, Any]) -> Any:
    """fp32 PyTorch logits of the same step: ctc's static decode wrapper around the fp32 model."""
    import torch

    from ctc.frontends.decode import static_decode_step

    step = static_decode_step(model32)
    dtype = next(model32.parameters()).dtype
    with torch.no_grad():
        ins = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        return step(**ins)[0].float()


def _err(got: Any, ref: Any) -> dict[str, float]:
    g, r = got.float(), ref.float()
    return {"max_abs": round(float((g - r).abs().max()), 5),
            "rel_l2": round(float((g - r).norm() / r.norm()), 6),
            "argmax_agree": round(float((g.argmax(-1) == r.argmax(-1)).float().mean()), 4)}


def run(out: Path, repeat: int, sections: list[str], results_path: Path) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "protocol": f"median of {repeat} CUDA-event timings per call after warm-up; "
                                       f"back-to-back = {repeat} consecutive calls / {repeat}",
                           "rows": [], "errors": []}
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    manifest = json.loads((out / "manifest.json").read_text())
    res["copy_tb_s"] = round(copy_bandwidth(), 3)
    print(f"device copy bandwidth: {res['copy_tb_s']} TB/s (read + write)", flush=True)

    def save() -> None:
        results_path.write_text(json.dumps(res, indent=1))

    for name, entry in manifest["artifacts"].items():
        if sections and not any(s in name for s in sections):
            continue
        try:
            _run_artifact(out / name, name, entry, manifest, repeat, res)
        except Exception as e:  # noqa: BLE001 - record and go on: one broken row must not lose the others
            res["errors"].append({"artifact": name, "error": f"{type(e).__name__}: {e}",
                                  "trace": traceback.format_exc()[-2000:]})
            print(f"!! {name}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        save()
    save()
    return res


def _decode_inputs(cfg: Any, batch: int, position: int, dtype: Any) -> dict[str, Any]:
    import torch

    from ctc.frontends.decode import static_decode_inputs

    ins = static_decode_inputs(cfg, MAX_LEN, position=position, batch=batch, seed=SEED + 1, dtype=torch.float32)
    # realistic cache magnitudes: rows past `position` are zero, as in a real cache
    for k, v in ins.items():
        if k.startswith("cache_"):
            v[:, :, position + 1:] = 0
            ins[k] = v.to(dtype)
    return {k: v.cuda() for k, v in ins.items()}


def _run_artifact(path: Path, name: str, entry: dict[str, Any], manifest: dict[str, Any], repeat: int,
                  res: dict[str, Any]) -> None:
    import torch

    shape, kind, batch, weights = entry["shape"], entry["kind"], entry["batch"], entry["weights"]
    model16 = _seeded_model(shape, torch.float16)
    dec = CtcDecoder(path, entry, model16)
    cfg = model16.config
    row_base = {"artifact": name, "shape": shape, "weights": weights, "batch": batch,
                "kernels_per_call": entry["kernels_per_call"], "weight_mb": round(dec.weight_bytes / 1e6, 2)}
    if kind == "decode":
        compiled: dict[str, Any] = {}
        model32 = _seeded_model(shape, torch.float32)
        ref32 = _dequantized(model32, dec.quant) if dec.quant else model32
        for pos in (128, 1024):
            ins = _decode_inputs(cfg, batch, pos, torch.float16)
            dec.bind_inputs(ins)
            logits = dec.step()[0]
            ref = _reference_logits(ref32, ins)
            acc = _err(logits, ref)  # vs the fp32 semantics of the (compressed) module
            eager16 = _err(_reference_logits(model16, ins), _reference_logits(model32, ins))
            if dec.quant:  # what int4 RTN costs on these random weights (real weights: see the CPU eval)
                row_base["int4_vs_fp32_original"] = _err(ref, _reference_logits(model32, ins))
            vm = _events_ms(dec.step, repeat)
            try:
                prof = kernel_profile(dec.step)
            except Exception as e:  # noqa: BLE001
                prof = {"error": f"{type(e).__name__}: {e}"[:200]}
            g, _ = dec.graph()
            graph = _events_ms(g.replay, repeat)
            kv_bytes = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * (pos + 1) * \
                (cfg.hidden_size // cfg.num_attention_heads) * 2
            # bytes a step streams: the bound weights, less the embedding table where the LM head does not
            # read it (int4: the head is quantized apart from the table, which is only gathered: one row
            # per sequence), plus the cache read
            table = cfg.vocab_size * cfg.hidden_size * 2
            gathered = table - batch * cfg.hidden_size * 2 if dec.quant and not INT4["blocks_only"] else 0
            step_bytes = dec.weight_bytes - gathered + kv_bytes
            row = {**row_base, "kv": pos, "ctc_vm": vm, "ctc_graph": graph, "accuracy_vs_fp32": acc, "profile": prof,
                   "torch_fp16_eager_vs_fp32": eager16, "bytes_per_step_mb": round(step_bytes / 1e6, 2),
                   "stream_tb_s": round(step_bytes / (graph["back_to_back_ms"] * 1e-3) / 1e12, 3)}
            row["stream_fraction_of_copy"] = round(row["stream_tb_s"] / res["copy_tb_s"], 3)
            row.update(_torch_decode(model16, cfg, batch, pos, repeat, weights, compiled))
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            del g
        if True:
            res["rows"].append({**row_base, "generation": _generate(dec, model16, cfg, batch)})
            print(json.dumps(res["rows"][-1]), flush=True)
        del model32, ref32
        compiled.clear()
        torch._dynamo.reset()
    else:
        ids = torch.randint(0, cfg.vocab_size, (batch, manifest["prefill"]),
                            generator=torch.Generator().manual_seed(SEED + 2)).cuda()
        dec.bind_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        logits = dec.step()[0]
        model32 = _seeded_model(shape, torch.float32)
        ref32 = _dequantized(model32, dec.quant) if dec.quant else model32
        with torch.no_grad():
            ref = ref32(input_ids=ids, use_cache=False).logits.float()
        del model32, ref32
        acc = _err(logits, ref)
        vm = _events_ms(dec.step, max(repeat // 4, 10))
        try:  # the whole prefill replayed as one CUDA graph: the kernels' time without the VM's launches
            g, _ = dec.graph()
            graph: dict[str, Any] = _events_ms(g.replay, max(repeat // 4, 10))
            del g
        except Exception as e:  # noqa: BLE001 - a row without it still says what the VM measured
            graph = {"error": f"{type(e).__name__}: {e}"[:300]}
        flops = 2 * batch * manifest["prefill"] * sum(p.numel() for p in model16.parameters())
        row = {**row_base, "tokens": manifest["prefill"], "ctc_vm": vm, "ctc_graph": graph, "accuracy_vs_fp32": acc,
               "ctc_tflop_s": round(flops / (vm["median_ms"] * 1e-3) / 1e12, 1)}
        row.update(_torch_prefill(model16, ids, max(repeat // 4, 10)))
        res["rows"].append(row)
        print(json.dumps(row), flush=True)


BASELINES = ["torch_eager", "torch_compile", "torch_compile_ro"]


def _torch_decode(model: Any, cfg: Any, batch: int, pos: int, repeat: int, weights: str,
                  compiled: dict[str, Any]) -> dict[str, Any]:
    """PyTorch fp16 with HF StaticCache: eager, torch.compile default and reduce-overhead, at ``pos``
    (``compiled`` keeps each compiled model across positions: the shapes do not change)."""
    import torch
    from transformers import StaticCache

    if weights != "f16" or not BASELINES:
        return {}
    out: dict[str, Any] = {}
    if "cache" not in compiled:
        cache = StaticCache(config=cfg, max_cache_len=MAX_LEN)
        with torch.no_grad():
            model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device="cuda"), past_key_values=cache,
                  use_cache=True)  # allocates the cache
        compiled["cache"] = cache
    cache = compiled["cache"]
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
    pos_ids = torch.full((batch, 1), pos, device="cuda", dtype=torch.long)

    def reset() -> None:  # StaticCache advances its own position: put it back before every step
        for layer in cache.layers:
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(pos)

    modes = {"torch_eager": None, "torch_compile": "default", "torch_compile_ro": "reduce-overhead"}
    for label, mode in modes.items():
        if label not in BASELINES:
            continue
        try:
            t0 = time.perf_counter()
            if label not in compiled:
                compiled[label] = model if mode is None else torch.compile(model, mode=mode)
            fn = compiled[label]

            def call(fn: Any = fn) -> Any:
                reset()
                return fn(input_ids=ids, position_ids=pos_ids, past_key_values=cache, use_cache=True)

            with torch.no_grad():
                for _ in range(3):
                    call()
                warm = time.perf_counter() - t0
                out[label] = {**_events_ms(call, repeat), "warmup_s": round(warm, 1)}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def _torch_prefill(model: Any, ids: Any, repeat: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for label, mode in (("torch_eager", None), ("torch_compile", "default")):
        if label not in BASELINES:
            continue
        try:
            fn = model if mode is None else torch.compile(model, mode=mode)
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(input_ids=ids, use_cache=False)
                out[label] = {**_events_ms(lambda fn=fn: fn(input_ids=ids, use_cache=False), repeat),
                              "warmup_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
        torch._dynamo.reset()
    return out


def _generate(dec: CtcDecoder, model16: Any, cfg: Any, batch: int, new_tokens: int = 128) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` after a 16-token prompt through ctc's decode loop (every step one
    CUDA-graph replay), and the same loop with torch.compile(reduce-overhead) + StaticCache."""
    import torch

    from ctc.generate import greedy_generate

    prompt = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(SEED + 3))
    t0 = time.perf_counter()
    gen = greedy_generate(dec.compiled, prompt, new_tokens, cuda_graph=True)
    out = {"ctc_tokens_per_s": round(gen.tokens_per_s, 1), "ctc_step_ms": round(gen.step_ms, 4),
           "ctc_total_s": round(time.perf_counter() - t0, 2), "new_tokens": new_tokens}
    with torch.no_grad():
        ref = model16.generate(prompt.cuda(), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                               pad_token_id=0)
    ref_new = ref[:, 16:].cpu()
    out["agree_with_torch_fp16_greedy"] = round(float((ref_new == gen.tokens[:, :ref_new.shape[1]]).float().mean()), 4)
    return out


def _table(res: dict[str, Any]) -> str:
    lines = [f"device {res['device']}, torch {res['torch']}, copy {res['copy_tb_s']} TB/s", res["protocol"],
             f"{'artifact':<26}{'kv':>5}{'kern':>6}{'ctc graph':>11}{'ctc vm':>9}{'eager':>9}{'compile':>9}"
             f"{'c-ro':>8}{'ratio':>7}{'TB/s':>6}{'err':>9}"]
    for r in res["rows"]:
        if "kv" not in r:
            continue

        def ms(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key, {})
            return f"{v['back_to_back_ms']:.3f}" if "back_to_back_ms" in v else "-"

        ro = r.get("torch_compile_ro", {}).get("back_to_back_ms")
        ratio = f"{r['ctc_graph']['back_to_back_ms'] / ro:.2f}" if ro else "-"
        lines.append(f"{r['artifact']:<26}{r['kv']:>5}{r['kernels_per_call']:>6}{ms('ctc_graph'):>11}"
                     f"{ms('ctc_vm'):>9}{ms('torch_eager'):>9}{ms('torch_compile'):>9}{ms('torch_compile_ro'):>8}"
                     f"{ratio:>7}{r['stream_tb_s']:>6}{r['accuracy_vs_fp32']['max_abs']:>9}")
    for r in res["rows"]:
        if "tokens" in r:
            lines.append(f"{r['artifact']}: ctc {r['ctc_vm']['median_ms']} ms ({r['ctc_tflop_s']} TFLOP/s; graph "
                         f"{r.get('ctc_graph', {}).get('median_ms')}), "
                         f"eager {r.get('torch_eager', {}).get('median_ms')}, compile "
                         f"{r.get('torch_compile', {}).get('median_ms')}; err {r['accuracy_vs_fp32']}")
        if "generation" in r:
            lines.append(f"{r['artifact']}: generation {r['generation']}")
    for e in res["errors"]:
        lines.append(f"ERROR {e['artifact']}: {e['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the CUDA libraries (no GPU needed)")
    b.add_argument("out", type=Path)
    b.add_argument("--only", nargs="*", default=list(ARTIFACTS), choices=list(ARTIFACTS))
    b.add_argument("--arch", default="sm_90a",
                   help="CUDA arch; sm_90a (H100/H200's arch-specific target) runs prefill linears on warpgroup MMA")
    r = sub.add_parser("run", help="time and check them on the GPU machine")
    r.add_argument("out", type=Path)
    r.add_argument("--repeat", type=int, default=200)
    r.add_argument("--only", nargs="*", default=[], help="substrings of artifact names to run")
    r.add_argument("--results", type=Path, default=Path(os.environ.get("OUT", ".")) / "cuda_decode.json")
    r.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES,
                   help="PyTorch rows to time (each torch.compile takes ~30-60 s per shape)")
    args = p.parse_args(argv)
    BASELINES[:] = args.baselines if args.cmd == "run" else BASELINES
    if args.cmd == "build":
        build(args.out, args.only, args.arch)
        return 0
    res = run(args.out, args.repeat, args.only, args.results)
    print(_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
