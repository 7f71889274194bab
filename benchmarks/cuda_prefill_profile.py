"""Per-kernel CUDA time of a ctc prefill library (torch.profiler, 5 calls), and torch.compile's on the same model.

GPU machine only, after ``python benchmarks/cuda_decode.py build OUT --only llama1b_f16_prefill512`` here:
``python benchmarks/cuda_prefill_profile.py OUT/llama1b_f16_prefill512`` (run from the repository root with the
carried runtime, as ``cuda_decode.py run``).  Writes ``$OUT/prof_ctc.txt`` and ``$OUT/prof_torch.txt``."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import cuda_decode as cd  # noqa: E402

path = Path(sys.argv[1])
man = json.loads((path.parent / "manifest.json").read_text())
entry = man["artifacts"][path.name]
model16 = cd._seeded_model(entry["shape"], torch.float16)
dec = cd.CtcDecoder(path, entry, model16)
ids = torch.randint(0, model16.config.vocab_size, (1, man["prefill"])).cuda()
dec.bind_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
for _ in range(3):
    dec.step()
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        dec.step()
    torch.cuda.synchronize()
tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
print(tab)
out = os.environ.get("OUT", ".")
Path(out, "prof_ctc.txt").write_text(tab)
fn = torch.compile(model16)
with torch.no_grad():
    for _ in range(3):
        fn(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof2:
        for _ in range(5):
            fn(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
tab2 = prof2.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
print(tab2)
Path(out, "prof_torch.txt").write_text(tab2)
