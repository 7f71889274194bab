"""Compressing shared weights once: helpers for passes that rewrite weights several nodes read.

After ``share-blocks`` or ``recursive``, one weight parameter is read by the linears of several
blocks.  A pass that transforms weights per linear (a channel reordering folded into the weight,
a quantization, a factorisation) must then give every reader the *same* transformed tensor, or
the model silently grows back into per-block copies.  Two things make that possible:

* :func:`linked_groups`: items (activations, linears) that touch a common weight must be planned
  together (one channel order, one set of statistics); union-find over the weight names.
* :class:`OncePerKey`: the transformed tensors, made the first time a key (the source weight and
  the transformation) is seen and read again by later readers, so they are stored once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import torch

__all__ = ["OncePerKey", "linked_groups", "merged_range", "perm_key"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def linked_groups(items: Mapping[K, Iterable[str]]) -> list[list[K]]:
    """Group the keys of ``items`` that share a weight name, transitively (in first-seen order).

    ``items[k]`` lists the weight parameter names item ``k`` touches; two items that touch one
    name are in one group, and so are items linked through a chain of such names.
    """
    parent: dict[K, K] = {k: k for k in items}

    def find(k: K) -> K:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[str, K] = {}
    for k, names in items.items():
        for n in names:
            if n in owner:
                a, b = find(owner[n]), find(k)
                if a != b:
                    parent[b] = a
            else:
                owner[n] = k
    groups: dict[K, list[K]] = {}
    for k in items:
        groups.setdefault(find(k), []).append(k)
    return list(groups.values())


def merged_range(los: Sequence[torch.Tensor], his: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min of the minima, max of the maxima) of several activations' ranges."""
    if not los or len(los) != len(his):
        raise ValueError("merged_range: give one (min, max) pair per activation, at least one")
    return torch.stack(list(los)).amin(0), torch.stack(list(his)).amax(0)


def perm_key(perm: torch.Tensor | None) -> bytes:
    """A hashable key for an index permutation (``b""`` for none)."""
    return b"" if perm is None else perm.to(torch.int64).contiguous().numpy().tobytes()


class OncePerKey(Generic[V]):
    """Values made once per key and handed out again: ``get(key, make)`` calls ``make()`` the first time."""

    def __init__(self) -> None:
        self._made: dict[Hashable, V] = {}
        self.hits = 0

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        if key in self._made:
            self.hits += 1
            return self._made[key]
        v = self._made[key] = make()
        return v

    def __len__(self) -> int:
        return len(self._made)
