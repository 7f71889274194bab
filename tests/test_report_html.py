"""report.html read structurally: well-formed, every inline SVG parses, the protocol is a table (no JSON blob, no
absolute paths), long note lists are folded, the per-block view says what each pass did to each block, and the
roofline plot carries the measured points.

The page is also rendered by a real headless Chromium (QtWebEngine from the PyQt6-WebEngine wheel, offscreen):
it loads, the console stays empty, every inline SVG has a size on screen and the screenshot is not blank."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_transformers import tiny_transformer

from ctc.analysis.blocks import block_view
from ctc.analysis.peaks import fpga_peaks
from ctc.analysis.roofline import analyze_module, measured_points
from ctc.report_html import render_html

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source", "track", "param"}


class _Checker(HTMLParser):
    """Balanced tags (outside inline SVG, whose elements may self-close), and the text of each element kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.svg_depth = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "svg":
            self.svg_depth += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if self.svg_depth == 0 and tag not in VOID:
            self.errors.append(f"self-closed <{tag}/> outside svg")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
            return
        self.stack.pop()
        if tag == "svg":
            self.svg_depth -= 1


def _well_formed(page: str) -> None:
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors[:5], c.stack[-5:])
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")
    assert "<script" not in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)


def _report() -> dict[str, Any]:
    from ctc.passes.base import PassContext, get_pass

    original = tiny_transformer("llama", layers=3, batch=1, seq=16)
    calib = [{"x": torch.randn(1, 16, 32)}]
    q = get_pass("quantize")({"w_bits": 4, "a_bits": 8, "w_granularity": "group", "group_size": 16}).run(
        original.clone(), PassContext(calibration=calib))
    passes = [{"name": "quantize", "selector": "all", "ops_diff": {"linear": -21, "quant_linear": 21},
               "notes": [f"note {i} /usr/lib/python3/site-packages/x{i}" for i in range(30)], "seconds": 0.1},
              {"name": "remove-blocks", "selector": "all", "ops_diff": {"linear": -7}, "notes": ["dropped 2"],
               "metrics": {"removed_blocks": [2], "block_influence": {"0": 0.2, "1": 0.05, "2": 0.01}}}]
    a = analyze_module(q, fpga_peaks("u280"), seq_len=16)
    roof = a.to_json()
    roof["measured"] = measured_points(a.phases[0], [{"kernel": "fused_matmul", "ms_per_run": 0.5}], latency_ms=1.0)
    roof["measured_phase"] = "forward"
    proto = {"calibrate": {"text": "gensim wiki (calibration split)", "split": "calibration", "windows": 1,
                           "tokenizer": "smollm2-fp32 (TokenizersBackend, vocab 49152)", "seq_len": 16,
                           "stride": "random starts", "selection": "random windows, seed 0", "seconds": 0.1},
             "evaluate": {"text": "gensim wiki (evaluation split)", "split": "evaluation", "windows": 2,
                          "tokenizer": "smollm2-fp32 (TokenizersBackend, vocab 49152)", "seq_len": 16,
                          "stride": "16 text tokens (disjoint windows, no context carried)",
                          "selection": "first consecutive windows", "token_range": "tokens 400..end of the text"}}
    return {"name": "tiny", "passed": True, "protocol": proto, "passes": passes,
            "metrics": {"ppl": {"original": 20.0, "compressed": 21.0, "protocol": "2 windows of 16, 30 scored",
                                "doc": "perplexity"}},
            "blocks": block_view(original, q, passes), "per_block": {"blocks": [0, 1, 2], "original": [1, 2, 3],
                                                                      "compressed": [1, 1, 1]},
            "roofline": roof, "targets": [{"kind": "cpu", "dir": "targets/cpu", "tuning_dir": "/root/.cache/ctc/t",
                                           "timings": {"lower_s": 0.1}, "notes": ["a", "b"]}],
            "recipe_text": "model bundled \"smollm2\"\n", "files": ["ir.txt"]}


def test_report_page_structure() -> None:
    r = _report()
    page = render_html(r)
    _well_formed(page)
    # the protocol is a table with one column per role, no JSON, no absolute paths
    assert '<th>calibrate</th><th>evaluate</th>' in page and "<td>stride</td>" in page
    assert "16 text tokens (disjoint windows, no context carried)" in page and '{"' not in page
    assert "/usr/lib" not in page and "/root/" not in page and ".../site-packages/x29" in page
    # 30 notes: two shown, the rest folded
    assert "<details><summary>28 more notes</summary>" in page
    # the per-block view names the scheme and the pass
    assert "W4A8 g16 ×7" in page and ">quantize<" in page
    # sensitivity and roofline plots with the measured points
    assert "block influence" in page and "<h2>Roofline</h2>" in page
    assert "gemm kernels (measured)" in page and "whole model (measured latency)" in page
    assert page.count("<svg") == 3  # bytes per block, block influence, roofline


def test_block_view_reads_bits_ranks_removal_and_sharing() -> None:
    original = tiny_transformer("llama", layers=3, batch=1, seq=8)
    m = original.clone()
    # block 2 reads block 0's up projection (a shared weight), block 1 disappears
    up2 = next(n for n in m.nodes if n.op == "linear" and n.scope == "layers.2.mlp.up")
    w0 = next(n for n in m.nodes if n.op == "param" and n.attrs["name"] == "layers.0.mlp.up.weight")
    up2.set_input(1, w0.output)
    for n in m.nodes:
        if n.block == 1:
            n.block = None
    rows = {r["block"]: r for r in block_view(original, m, [])}
    assert rows[0]["shares_with"] == [2] and rows[2]["shares_with"] == [0]
    assert rows[1]["removed"] and rows[1]["bytes_after"] == 0


@pytest.mark.skipif(importlib.util.find_spec("PyQt6") is None or
                    importlib.util.find_spec("PyQt6.QtWebEngineWidgets") is None,
                    reason="needs PyQt6-WebEngine (the dev extra) for a headless Chromium")
def test_report_page_renders_in_a_headless_browser(tmp_path: Path) -> None:
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    page.write_text(render_html(_report()))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("render_page.py")), str(page), str(shot)],
                         capture_output=True, text=True, timeout=180)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    seen = json.loads(lines[-1])
    assert seen["loaded"] and seen["console"] == [], seen
    dom = seen["dom"]
    assert len(dom["svgs"]) == 3 and all(w > 100 and h > 100 for w, h in dom["svgs"]), dom
    assert dom["tables"] >= 6 and dom["details"] == 2 and dom["broken_images"] == 0, dom  # notes, "how measured"
    from PyQt6.QtGui import QImage

    img = QImage(str(shot))
    assert (img.width(), img.height()) == tuple(seen["shot"]) and img.width() > 0
    colours = {img.pixel(x, y) for x in range(0, img.width(), 7) for y in range(0, min(img.height(), 1500), 7)}
    assert len(colours) > 20, "the screenshot is (nearly) blank"
