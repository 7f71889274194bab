"""Helpers for compressing shared weights once: linking items by weight, merged ranges, once-per-key values."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.passes.shared_weights import OncePerKey, linked_groups, merged_range, perm_key


def test_linked_groups_follow_chains_of_shared_weights() -> None:
    items = {"x0": ["q", "k"], "x1": ["q2"], "x2": ["k", "o"], "x3": ["o"], "x4": []}
    assert linked_groups(items) == [["x0", "x2", "x3"], ["x1"], ["x4"]]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 12), st.lists(st.sampled_from("abcdefg"), max_size=3), max_size=10))
def test_linked_groups_partition_and_separate(items: dict[int, list[str]]) -> None:
    groups = linked_groups(items)
    assert sorted(k for g in groups for k in g) == sorted(items)
    where = {k: i for i, g in enumerate(groups) for k in g}
    for a in items:
        for b in items:
            if set(items[a]) & set(items[b]):
                assert where[a] == where[b]
    for g in groups:  # every group is connected through shared names
        seen, todo = {g[0]}, [g[0]]
        while todo:
            k = todo.pop()
            for j in g:
                if j not in seen and set(items[k]) & set(items[j]):
                    seen.add(j)
                    todo.append(j)
        assert seen == set(g)


def test_merged_range_and_perm_key() -> None:
    lo, hi = merged_range([torch.tensor([0.0, -1.0]), torch.tensor([-2.0, 0.0])],
                          [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])])
    assert lo.tolist() == [-2.0, -1.0] and hi.tolist() == [3.0, 5.0]
    assert perm_key(torch.tensor([1, 0])) == perm_key(torch.tensor([1, 0], dtype=torch.int32))
    assert perm_key(torch.tensor([1, 0])) != perm_key(torch.tensor([0, 1])) and perm_key(None) == b""


def test_once_per_key_makes_each_value_once() -> None:
    made: list[str] = []
    once: OncePerKey[str] = OncePerKey()

    def make(name: str) -> str:
        made.append(name)
        return name.upper()

    assert [once.get(k, lambda k=k: make(k)) for k in ("a", "b", "a", "a")] == ["A", "B", "A", "A"]
    assert made == ["a", "b"] and once.hits == 2 and len(once) == 2
