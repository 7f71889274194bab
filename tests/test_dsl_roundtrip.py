"""Hypothesis: printing any Recipe and parsing it back gives the same Recipe (spans aside)."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctc.dsl import (
    Check,
    Dataset,
    Emit,
    EmitFormat,
    ModelSource,
    Recipe,
    RecipeStep,
    SelectorItem,
    Target,
    parse,
    print_recipe,
)

_KEYWORDS = {"true", "false", "none", "on", "op", "blocks", "model", "calibrate", "evaluate", "pipeline", "target",
             "check", "emit", "trials"}
names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda s: s not in _KEYWORDS)
pass_names = st.from_regex(r"[a-z_][a-z0-9_\-]{0,12}", fullmatch=True).filter(lambda s: s not in _KEYWORDS)
text = st.text(alphabet=string.ascii_letters + string.digits + ' _-./*?[]"\\#\t\n{}=<>%ü', max_size=20)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.integers(-10**12, 10**12), floats, text, st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
options = st.dictionaries(names, values, max_size=4)
selectors = st.one_of(
    st.tuples(st.integers(0, 50), st.integers(1, 20)).map(lambda t: SelectorItem("blocks", (t[0], t[0] + t[1]))),
    text.map(lambda s: SelectorItem("scope", s)),
    names.map(lambda s: SelectorItem("op", s)),
)
steps = st.builds(RecipeStep, name=pass_names, options=options, selectors=st.lists(selectors, max_size=3))
models = st.builds(ModelSource, kind=names, ref=text, options=options)
datasets = lambda role: st.builds(Dataset, role=st.just(role), source=names, path=st.none() | text,  # noqa: E731
                                  options=options)
targets = st.builds(Target, kind=names, options=options.map(lambda d: {k: v for k, v in d.items() if k != "trials"}),
                    trials=st.none() | st.integers(0, 10**6))
checks = st.builds(Check, metric=names, op=st.sampled_from(["<=", ">=", "<", ">", "=="]),
                   value=st.integers(-1000, 1000) | floats, unit=st.sampled_from([None, "x", "%"]))
recipes = st.builds(Recipe, model=st.none() | models, calibrate=st.none() | datasets("calibrate"),
                    evaluate=st.none() | datasets("evaluate"), pipeline=st.lists(steps, max_size=5),
                    targets=st.lists(targets, max_size=3), checks=st.lists(checks, max_size=4),
                    emit=st.none() | text.map(lambda s: Emit(s)),
                    exports=st.lists(st.builds(EmitFormat, format=pass_names, options=options), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_print_parse_roundtrip(r: Recipe) -> None:
    text_ = print_recipe(r)
    back = parse(text_, "gen.ctc")
    assert back == r, text_
    # printing is canonical: a second round gives the same text
    assert print_recipe(back) == text_


@settings(max_examples=100, deadline=None)
@given(recipes)
def test_every_node_has_a_span(r: Recipe) -> None:
    back = parse(print_recipe(r), "gen.ctc")
    for node in [back.model, back.calibrate, back.evaluate, back.emit, *back.pipeline, *back.targets, *back.checks,
                     *back.exports]:
        if node is not None:
            assert node.span.file == "gen.ctc" and node.span.line >= 1 and node.span.col >= 1
    for s in back.pipeline:
        for sel in s.selectors:
            assert sel.span.line == s.span.line and sel.span.col > s.span.col
        for sp in s.option_spans.values():
            assert sp.line == s.span.line
