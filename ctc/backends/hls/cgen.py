"""Print the fpga target's lowered TIR and Relax call sequence as standalone HLS C.

Why ctc prints the C itself: TVM's C codegen writes TVM-runtime entry points (packed-function
signatures, DLTensor checks); an HLS tool wants plain functions over pointers with pragmas.
The input is TVM's own IR after its lowering passes (:func:`lower_tir`): flattened buffers,
loops carrying the schedule's annotations (``hls.pipeline``, ``hls.unroll``) and the kernels'
``hls.partition`` attribute.  Output, one directory:

* ``kernels/<name>.c`` -- one file per kernel (every ``quant_linear`` layer has its own), with
  ``#pragma HLS PIPELINE II=1`` / ``UNROLL factor=F`` / ``ARRAY_PARTITION`` / ``INTERFACE m_axi``;
* ``ctc_top.c`` / ``ctc_top.h`` -- ``ctc_top(weights, inputs..., outputs...)`` calls the kernels in
  the Relax program's order on static off-chip buffers; constants live in one ``weights.bin`` blob;
* ``tb.c`` -- the test bench (``./csim DATA_DIR weights.bin``; ``make run``): reads the weights and
  ``DATA_DIR/input_*.bin``, runs ``ctc_top``, compares
  the outputs with ``expected_*.bin`` bit for bit and prints ``PASS``/``FAIL``;
* ``Makefile`` -- ``gcc -O2 -ffp-contract=off`` (no fused multiply-add: the integer model rounds
  every float operation once).

Innermost loops without an annotation are pipelined (II=1 requested): the default schedule of the
TE kernels; :mod:`.perf` applies the same rule.  Unknown TIR constructs raise :class:`CGenError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CGenError", "CProgram", "c_kernel", "is_pipelined", "lower_tir", "write_program"]

CTYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t",
          "int32": "int32_t", "int64": "int64_t", "uint32": "uint32_t", "bool": "bool", "uint1": "bool"}
ALIGN = 64


class CGenError(Exception):
    """A TIR construct or Relax binding the HLS C printer does not handle (names it)."""


def _unique_param_names(mod: Any) -> Any:
    """``mod`` with each PrimFunc's buffer parameters named apart.

    Relax's ``emit_te`` names a placeholder after its operand, so ``x * x`` (GPT-2's ``pow(x, 3)``) gives a
    kernel ``multiply(lv57, lv57, out)``, which the block builder reuses for ``y * x``.  The printer matches
    parameters by name after flattening (see :func:`root_name`), so it would read one operand twice; TVMScript
    prints the names apart (``lv57``, ``lv57_1``) and parses back the same function under them."""
    import tvm

    out, renamed = {}, False
    for gv, f in mod.functions.items():
        names = [str(p.name) for p in getattr(f, "params", ())]
        if type(f).__name__ == "PrimFunc" and len(set(names)) != len(names):
            f, renamed = tvm.script.from_source(f.script()), True
            if len({str(p.name) for p in f.params}) != len(names):
                raise CGenError(f"kernel {gv.name_hint}: parameters {names} share names that TVMScript keeps")
        out[gv] = f
    return tvm.IRModule(out, attrs=mod.attrs) if renamed else mod


def lower_tir(mod: Any) -> Any:
    """TVM's TIR lowering up to flat buffers (no vectorization, unrolling or packed API)."""
    import tvm
    from tvm import s_tir, tirx

    mod = _unique_param_names(mod)
    passes = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(), s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        tirx.transform.StmtSimplify(), tirx.transform.RemoveNoOp(), tirx.transform.CommonSubexprElim(),
    ])
    return passes(mod)


def ctype(dtype: Any) -> str:
    s = str(dtype)
    if s not in CTYPES:
        raise CGenError(f"dtype {s} has no C type here")
    return CTYPES[s]


def float_literal(v: float, dtype: str) -> str:
    """An exact C literal: hex float of the fp32 (or fp64) value; +-INFINITY; NAN."""
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    if dtype == "float32":
        f = struct.unpack("f", struct.pack("f", v))[0]
        return f"{float(f).hex()}f"
    return float(v).hex()


def _annot(loop: Any, key: str) -> int | None:
    a = loop.annotations
    return int(a[key]) if key in a else None


def _has_loop(stmt: Any) -> bool:
    if type(stmt).__name__ == "For":
        return True
    found = [False]

    def visit(s: Any) -> None:
        if type(s).__name__ == "For":
            found[0] = True
        elif not found[0]:
            for ch in _children(s):
                visit(ch)

    for ch in _children(stmt):
        visit(ch)
    return found[0]


def _children(s: Any) -> list[Any]:
    t = type(s).__name__
    if t == "SeqStmt":
        return list(s.seq)
    if t in ("For", "AttrStmt", "While"):
        return [s.body]
    if t == "IfThenElse":
        return [s.then_case] + ([s.else_case] if s.else_case is not None else [])
    return []


def is_pipelined(loop: Any, inside_pipeline: bool) -> bool:
    """The schedule rule shared with :mod:`.perf`: annotated ``hls.pipeline``, or an innermost loop without
    an HLS annotation outside any pipelined loop (the TE kernels' default)."""
    if _annot(loop, "hls.pipeline") is not None:
        return True
    if inside_pipeline or _annot(loop, "hls.unroll") is not None:
        return False
    return not _has_loop(loop.body)


def _root(x: Any) -> Any:
    d = getattr(x, "data", x)
    while type(d).__name__ == "Call" and str(getattr(d.op, "name", "")) == "tirx.buffer_data":
        d = d.args[0]
    return d


def root_name(x: Any) -> str:
    """Name of the Var behind a buffer's storage (``tirx.buffer_data(v)``), or of a plain Var.

    Kernel parameters are matched by this name: TVM 0.27's flattening re-creates the handle Vars of
    the parameters it views (same names, new objects)."""
    d = _root(x)
    return str(d.name) if hasattr(d, "name") else "@"


def storage(x: Any) -> str:
    """Identity of a buffer's storage or of a Var: its name and object handle."""
    d = _root(x)
    return f"{root_name(x)}#{int(d.__chandle__())}"


class _Printer:
    def __init__(self, names: dict[str, str]):
        self.names = names  # data Var -> C name
        self.lines: list[str] = []
        self.vars: dict[str, str] = {}
        self.used: set[str] = set(names.values())

    # ------------------------------------------------------------------ names
    def var(self, v: Any) -> str:
        k = storage(v)
        if k in self.vars:
            return self.vars[k]
        if root_name(v) in self.names:  # a kernel parameter (by name, see root_name)
            return self.names[root_name(v)]
        if k not in self.vars:
            base = "".join(c if c.isalnum() else "_" for c in str(getattr(v, "name", "v"))) or "v"
            name, i = base, 1
            while name in self.used:
                name, i = f"{base}_{i}", i + 1
            self.used.add(name)
            self.vars[k] = name
        return self.vars[k]

    def buf(self, b: Any) -> str:
        return self.var(b.data)

    def alloc(self, b: Any) -> str:
        """A fresh C name (from the buffer's own name) for an allocated buffer."""
        k = storage(b)
        base = "".join(c if c.isalnum() else "_" for c in str(b.name)) or "buf"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        self.vars[k] = name
        return name

    # ------------------------------------------------------------------ expressions
    def expr(self, e: Any) -> str:  # noqa: C901 - one branch per node kind
        t = type(e).__name__
        dt = str(e.ty.dtype) if hasattr(e, "ty") and hasattr(e.ty, "dtype") else str(getattr(e, "dtype", ""))
        if t == "IntImm":
            if dt == "bool":
                return "1" if e.value else "0"
            return f"INT64_C({e.value})" if dt == "int64" else str(int(e.value))
        if t == "FloatImm":
            return float_literal(float(e.value), dt)
        if t == "Var":
            return self.var(e)
        if t in ("BufferLoad", "TensorLoad"):
            src = e.buffer if t == "BufferLoad" else e.source
            if len(e.indices) != 1:
                raise CGenError(f"buffer {src} is not flat ({len(e.indices)} indices)")
            return f"{self.buf(src)}[{self.expr(e.indices[0])}]"
        binop = {"Add": "+", "Sub": "-", "Mul": "*", "EQ": "==", "NE": "!=", "LT": "<", "LE": "<=", "GT": ">",
                 "GE": ">=", "And": "&&", "Or": "||", "LShift": "<<", "RShift": ">>", "BitwiseAnd": "&",
                 "BitwiseOr": "|", "BitwiseXor": "^"}
        if t in binop:
            return f"({self.expr(e.a)} {binop[t]} {self.expr(e.b)})"
        if t == "Div":
            return f"({self.expr(e.a)} / {self.expr(e.b)})"
        if t in ("FloorDiv", "FloorMod", "Mod"):
            if "float" in dt:
                raise CGenError(f"{t} on {dt}")
            if t == "Mod":
                return f"({self.expr(e.a)} % {self.expr(e.b)})"
            return f"ctc_{'floordiv' if t == 'FloorDiv' else 'floormod'}({self.expr(e.a)}, {self.expr(e.b)})"
        if t in ("Min", "Max"):
            a, b = self.expr(e.a), self.expr(e.b)
            op = "<" if t == "Min" else ">"
            return f"(({a}) {op} ({b}) ? ({a}) : ({b}))"
        if t in ("Not", "BitwiseNot"):
            return f"({'!' if t == 'Not' else '~'}{self.expr(e.a)})"
        if t == "Select":
            return f"({self.expr(e.condition)} ? {self.expr(e.true_value)} : {self.expr(e.false_value)})"
        if t == "Cast":
            return f"(({ctype(dt)})({self.expr(e.value)}))"
        if t == "Let":
            raise CGenError("Let expressions are not printed (run CommonSubexprElim before)")
        if t == "Call":
            return self.call(e, dt)
        raise CGenError(f"TIR expression {t} is not supported by the HLS C printer: {e}")

    def call(self, e: Any, dt: str) -> str:
        full = str(e.op.name) if hasattr(e.op, "name") else str(e.op)
        op = "tirx." + full.split(".")[-1]  # TVM 0.27 spells them tirx.* or prim.*
        a = [self.expr(x) for x in e.args]
        f32 = dt == "float32"
        math1 = {"tirx.floor": "floor", "tirx.sqrt": "sqrt", "tirx.nearbyint": "nearbyint", "tirx.fabs": "fabs",
                 "tirx.ceil": "ceil", "tirx.trunc": "trunc"}
        if op in math1:
            return f"{math1[op]}{'f' if f32 else ''}({a[0]})"
        if op == "tirx.if_then_else":
            return f"({a[0]} ? {a[1]} : {a[2]})"
        infix = {"tirx.shift_left": "<<", "tirx.shift_right": ">>", "tirx.bitwise_and": "&", "tirx.bitwise_or": "|",
                 "tirx.bitwise_xor": "^"}
        if op in infix:
            return f"({a[0]} {infix[op]} {a[1]})"
        if op == "tirx.bitwise_not":
            return f"(~{a[0]})"
        if op == "tirx.reinterpret":
            src = str(e.args[0].ty.dtype) if hasattr(e.args[0], "ty") else str(e.args[0].dtype)
            if (src, dt) == ("int32", "float32"):
                return f"ctc_bits_to_float({a[0]})"
            if (src, dt) == ("float32", "int32"):
                return f"ctc_float_to_bits({a[0]})"
        if op == "tirx.likely":
            return a[0]
        raise CGenError(f"TIR call {full} ({dt}) is not supported by the HLS C printer")

    # ------------------------------------------------------------------ statements
    def emit(self, line: str, depth: int) -> None:
        self.lines.append("  " * depth + line)

    def stmt(self, s: Any, depth: int, in_pipe: bool) -> None:  # noqa: C901 - one branch per node kind
        t = type(s).__name__
        if t == "SeqStmt":
            for ch in s.seq:
                self.stmt(ch, depth, in_pipe)
        elif t == "For":
            v = self.var(s.loop_var)
            ext = self.expr(s.extent)
            lo = self.expr(s.min)
            vt = ctype(str(s.loop_var.ty.dtype) if hasattr(s.loop_var, "ty") else s.loop_var.dtype)
            self.emit(f"for ({vt} {v} = {lo}; {v} < {lo} + {ext}; ++{v}) {{", depth)
            pipe = is_pipelined(s, in_pipe)
            if pipe and not in_pipe:
                self.emit("#pragma HLS PIPELINE II=1", depth + 1)
            u = _annot(s, "hls.unroll")
            if u is not None or in_pipe:
                self.emit(f"#pragma HLS UNROLL{f' factor={u}' if u and not in_pipe else ''}", depth + 1)
            self.stmt(s.body, depth + 1, in_pipe or pipe)
            self.emit("}", depth)
        elif t == "BufferStore":
            if len(s.indices) != 1:
                raise CGenError(f"buffer {s.buffer.name} is not flat")
            self.emit(f"{self.buf(s.buffer)}[{self.expr(s.indices[0])}] = {self.expr(s.value)};", depth)
        elif t == "IfThenElse":
            self.emit(f"if ({self.expr(s.condition)}) {{", depth)
            self.stmt(s.then_case, depth + 1, in_pipe)
            if s.else_case is not None:
                self.emit("} else {", depth)
                self.stmt(s.else_case, depth + 1, in_pipe)
            self.emit("}", depth)
        elif t == "Bind":
            dt = str(s.var.ty.dtype) if hasattr(s.var, "ty") else str(s.var.dtype)
            self.emit(f"const {ctype(dt)} {self.var(s.var)} = {self.expr(s.value)};", depth)
        elif t == "AllocBuffer":
            b = s.buffer
            n = int(np.prod([int(x) for x in b.shape]))
            name = self.alloc(b)
            self.emit(f"static {ctype(b.dtype)} {name}[{n}];", depth)
            part = self.partition.get(b.name)
            if part:
                self.emit(f"#pragma HLS ARRAY_PARTITION variable={name} cyclic factor={part} dim=1", depth)
        elif t == "DeclBuffer":
            if root_name(s.buffer) not in self.names and storage(s.buffer) not in self.vars:
                raise CGenError(f"declared buffer {s.buffer.name} aliases unknown storage")
        elif t == "AttrStmt":
            self.stmt(s.body, depth, in_pipe)
        elif t == "Evaluate":
            if type(s.value).__name__ != "IntImm":
                raise CGenError(f"TIR Evaluate of {s.value} is not supported")
        else:
            raise CGenError(f"TIR statement {t} is not supported by the HLS C printer")

    partition: dict[str, int] = {}


def c_kernel(name: str, func: Any) -> tuple[str, str]:
    """(prototype, definition) of one lowered PrimFunc as an HLS C function."""
    names: dict[str, str] = {}
    params = []
    for p in func.params:
        ty = getattr(p, "ty", None)
        if type(ty).__name__ != "BufferType":
            raise CGenError(f"kernel {name}: scalar parameter {p} (only buffers are supported)")
        cname = "".join(c if c.isalnum() else "_" for c in str(p.name))
        while cname in names.values():
            cname += "_"
        if root_name(p) in names:  # the body names parameters by name: two of one name would read one of them
            raise CGenError(f"kernel {name}: two parameters are named {root_name(p)!r} (lower it with lower_tir)")
        names[root_name(p)] = cname
        params.append((ctype(ty.dtype), cname))
    pr = _Printer(names)
    part = dict(func.attrs["hls.partition"]) if func.attrs is not None and "hls.partition" in func.attrs else {}
    pr.partition = {str(k): int(v[1]) for k, v in part.items() if int(v[1]) > 1}
    sig = f"void {name}({', '.join(f'{t}* {n}' for t, n in params)})"
    for t_, n in params:
        del t_
        pr.emit(f"#pragma HLS INTERFACE m_axi port={n} offset=slave bundle=gmem", 1)
    pr.emit("#pragma HLS INTERFACE s_axilite port=return", 1)
    pr.stmt(func.body, 1, False)
    body = "\n".join(pr.lines)
    return sig + ";", f"{sig} {{\n{body}\n}}\n"


def c_name(kernel: str) -> str:
    """The C function of a kernel: ``k_<name>`` (kernel names such as ``exp`` would clash with libm)."""
    return f"k_{kernel}"


PRELUDE = """#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static inline int64_t ctc_floordiv(int64_t a, int64_t b) { int64_t q = a / b; return (q * b > a) ? q - 1 : q; }
static inline int64_t ctc_floormod(int64_t a, int64_t b) { return a - ctc_floordiv(a, b) * b; }
static inline float ctc_bits_to_float(int32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
static inline int32_t ctc_float_to_bits(float f) { int32_t b; memcpy(&b, &f, sizeof b); return b; }
"""


@dataclass
class CProgram:
    """What :func:`write_program` produced: files, kernels in call order, the weights blob layout."""

    out_dir: Path
    kernels: list[str]
    calls: list[tuple[str, list[str]]]
    inputs: list[tuple[str, str, int]]  # (name, dtype, elements)
    outputs: list[tuple[str, str, int]]
    weights_bytes: int
    notes: list[str] = field(default_factory=list)


def _tensor_ty(sinfo: Any) -> tuple[str, int]:
    shape = [int(d) for d in sinfo.shape]
    return str(sinfo.dtype), int(np.prod(shape)) if shape else 1


def write_program(mod: Any, out_dir: Path, input_names: list[str], output_names: list[str], *,
                  debug: bool = False) -> CProgram:
    """Write the C project for the Relax module ``mod`` (legalized; PrimFuncs lowered by :func:`lower_tir`)."""
    from tvm import relax
    from tvm.ir import GenericConst

    out_dir.mkdir(parents=True, exist_ok=True)
    kdir = out_dir / "kernels"
    kdir.mkdir(exist_ok=True)
    main = mod["main"]
    protos: dict[str, str] = {}
    for gv in mod.get_global_vars():
        f = mod[gv]
        if isinstance(f, relax.Function):
            continue
        proto, text = c_kernel(c_name(gv.name_hint), f)
        protos[gv.name_hint] = proto
        (kdir / f"{gv.name_hint}.c").write_text(f"// ctc fpga kernel {gv.name_hint} (generated)\n"
                                                 f'#include "../ctc_top.h"\n\n{text}')
    # ---------------------------------------------------------------- top function
    env: dict[Any, str] = {}
    decls: list[str] = []
    body: list[str] = []
    blob: list[np.ndarray] = []
    const_off: dict[int, str] = {}
    offset = 0
    calls: list[tuple[str, list[str]]] = []
    ins = []
    for i, p in enumerate(main.params):
        dt, n = _tensor_ty(p.ty)
        env[p] = f"x{i}"
        ins.append((input_names[i] if i < len(input_names) else p.name, dt, n))
    counter = [0]

    def buf(dt: str, n: int) -> str:
        counter[0] += 1
        nm = f"t{counter[0]}"
        decls.append(f"static {ctype(dt)} {nm}[{n}];")
        return nm

    def arg(e: Any) -> str:
        nonlocal offset
        if isinstance(e, relax.Var):
            if e not in env:
                raise CGenError(f"top function: {e.name} used before it is defined")
            return env[e]
        if isinstance(e, GenericConst):
            key = int(e.__chandle__())
            if key not in const_off:
                arr = np.ascontiguousarray(e.value.numpy())
                pad = (-offset) % ALIGN
                if pad:
                    blob.append(np.zeros(pad, np.uint8))
                    offset += pad
                const_off[key] = f"(({ctype(str(arr.dtype))}*)(weights + {offset}))"
                blob.append(arr.view(np.uint8).reshape(-1))
                offset += arr.nbytes
            return const_off[key]
        raise CGenError(f"top function: argument {type(e).__name__} is not supported")

    seq = main.body
    tuples: dict[Any, list[Any]] = {}
    for block in seq.blocks:
        for b in block.bindings:
            v = b.var
            val = b.value
            if isinstance(val, relax.Call) and val.op.name == "relax.call_tir":
                gv, args = val.args[0], list(val.args[1].fields)
                dt, n = _tensor_ty(v.ty)
                out = buf(dt, n)
                env[v] = out
                names_ = [arg(a) for a in args] + [out]
                body.append(f"  {c_name(gv.name_hint)}({', '.join(names_)});")
                if debug:
                    body.append(f'  ctc_dump("{out}", {out}, {n} * sizeof({ctype(dt)}));')
                calls.append((gv.name_hint, names_))
            elif isinstance(val, relax.Call) and val.op.name == "relax.reshape":
                env[v] = arg(val.args[0])
            elif isinstance(val, (relax.Var, GenericConst)):
                env[v] = arg(val)
            elif isinstance(val, relax.Tuple):
                tuples[v] = list(val.fields)
            else:
                raise CGenError(f"top function: binding {v.name} = {type(val).__name__} "
                                f"{getattr(getattr(val, 'op', None), 'name', '')} is not supported")
    result = seq.body
    while isinstance(result, relax.Var) and result in tuples:
        result = relax.Tuple(tuples[result])
    res = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    outs = []
    for i, r in enumerate(res):
        dt, n = _tensor_ty(r.ty)
        body.append(f"  memcpy(out{i}, {arg(r)}, {n} * sizeof({ctype(dt)}));")
        outs.append((output_names[i] if i < len(output_names) else f"out{i}", dt, n))
    params = ["const uint8_t* weights"] + [f"const {ctype(dt)}* in{i}" for i, (_, dt, _) in enumerate(ins)] + \
        [f"{ctype(dt)}* out{i}" for i, (_, dt, _) in enumerate(outs)]
    head = ["// ctc fpga design (generated): kernel prototypes and the top function", "#ifndef CTC_TOP_H",
            "#define CTC_TOP_H", PRELUDE, *protos.values(), f"void ctc_top({', '.join(params)});", "#endif", ""]
    (out_dir / "ctc_top.h").write_text("\n".join(head))
    dump = ["#include <stdio.h>", "static void ctc_dump(const char* name, const void* p, size_t n) {",
            "  char path[256]; snprintf(path, sizeof path, \"dump_%s.bin\", name);",
            "  FILE* f = fopen(path, \"wb\"); if (f) { fwrite(p, 1, n, f); fclose(f); }", "}"] if debug else []
    top = ["// ctc fpga design (generated): layers in the order the Relax program calls them", '#include "ctc_top.h"',
           *dump, "", *decls, "", f"void ctc_top({', '.join(params)}) {{"]
    # kernels take plain pointers; the inputs are only read
    top += [f"  {ctype(dt)}* x{i} = ({ctype(dt)}*)in{i};" for i, (_, dt, _) in enumerate(ins)]
    top += [*body, "}", ""]
    (out_dir / "ctc_top.c").write_text("\n".join(top))
    data = np.concatenate(blob) if blob else np.zeros(0, np.uint8)
    data.tofile(out_dir / "weights.bin")
    _write_testbench(out_dir, ins, outs)
    kernels = sorted(protos)
    (out_dir / "Makefile").write_text(
        "CC ?= gcc\nCFLAGS ?= -O2 -std=c11 -ffp-contract=off -fno-fast-math -Wall -Wno-unknown-pragmas "
        "-Wno-unused-variable -Wno-unused-function\n\n"
        "csim: ctc_top.c tb.c $(wildcard kernels/*.c)\n\t$(CC) $(CFLAGS) -o $@ $^ -lm\n\n"
        "run: csim\n\t./csim data weights.bin\n\n"
        "clean:\n\trm -f csim output_*.bin\n")
    return CProgram(out_dir, kernels, calls, ins, outs, int(data.nbytes))


def _write_testbench(out_dir: Path, ins: list[tuple[str, str, int]], outs: list[tuple[str, str, int]]) -> None:
    L = ['// ctc fpga test bench (generated): run ctc_top on input_*.bin, compare with expected_*.bin bit for bit',
         '#include <stdio.h>', '#include <stdlib.h>', '#include "ctc_top.h"', "",
         "static void* load_file(const char* path, size_t bytes) {",
         "  FILE* f = fopen(path, \"rb\"); if (!f) { fprintf(stderr, \"cannot open %s\\n\", path); exit(2); }",
         "  void* p = aligned_alloc(64, bytes ? (bytes + 63) / 64 * 64 : 64);",
         "  if (bytes && fread(p, 1, bytes, f) != bytes) { fprintf(stderr, \"short read %s\\n\", path); exit(2); }",
         "  fclose(f); return p;", "}", "",
         "static void* load(const char* dir, const char* name, size_t bytes) {",
         "  char path[4096]; snprintf(path, sizeof path, \"%s/%s\", dir, name); return load_file(path, bytes);", "}",
         "",
         "int main(int argc, char** argv) {",
         "  const char* dir = argc > 1 ? argv[1] : \"data\";",
         "  const char* wp = argc > 2 ? argv[2] : \"weights.bin\";",
         "  FILE* wf = fopen(wp, \"rb\"); if (!wf) { fprintf(stderr, \"cannot open %s\\n\", wp); return 2; }",
         "  fseek(wf, 0, SEEK_END); long wn = ftell(wf); fclose(wf);",
         "  const uint8_t* w = (const uint8_t*)load_file(wp, (size_t)wn);"]
    for i, (_, dt, n) in enumerate(ins):
        L.append(f"  const {ctype(dt)}* in{i} = ({ctype(dt)}*)load(dir, \"input_{i}.bin\", {n} * sizeof({ctype(dt)}));")
    for i, (_, dt, n) in enumerate(outs):
        c = ctype(dt)
        L.append(f"  {c}* out{i} = ({c}*)aligned_alloc(64, ({n} * sizeof({c}) + 63) / 64 * 64);")
    args = "".join(f", in{i}" for i in range(len(ins))) + "".join(f", out{i}" for i in range(len(outs)))
    L.append(f"  ctc_top(w{args});")
    L.append("  int failed = 0;")
    for i, (_, dt, n) in enumerate(outs):
        L += [f"  {{ char op[4096]; snprintf(op, sizeof op, \"%s/output_{i}.bin\", dir); FILE* f = fopen(op, \"wb\");",
              f"    if (f) {{ fwrite(out{i}, sizeof({ctype(dt)}), {n}, f); fclose(f); }} }}",
              f"  {{ const {ctype(dt)}* e = ({ctype(dt)}*)load(dir, \"expected_{i}.bin\", {n} * sizeof({ctype(dt)}));",
              "    long bad = 0, first = -1;",
              f"    for (long j = 0; j < {n}; ++j) if (memcmp(&e[j], &out{i}[j], sizeof e[j]) != 0) "
              "{ if (first < 0) first = j; ++bad; }",
              f"    if (bad) {{ failed = 1; printf(\"FAIL output {i}: %ld of {n} values differ (first at %ld)\\n\", "
              "bad, first); }",
              f"    else printf(\"PASS output {i}: {n} values bit-exact\\n\"); }}"]
    L += ["  return failed;", "}", ""]
    (out_dir / "tb.c").write_text("\n".join(L))
