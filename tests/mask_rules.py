"""Masks built one tap at a time from a rule on its offsets, to check the factories by."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch


def offsets(sizes: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every (index, offset) pair of a kernel, offset = index - size // 2, in raster order."""
    for index in itertools.product(*(range(k) for k in sizes)):
        yield index, tuple(i - k // 2 for i, k in zip(index, sizes, strict=True))


def by_rule(sizes: tuple[int, ...], rule: Callable[[tuple[int, ...]], bool]) -> torch.Tensor:
    """The mask that keeps the taps whose offset satisfies ``rule``, built one tap at a time."""
    mask = torch.zeros(sizes, dtype=torch.bool)
    for index, o in offsets(sizes):
        mask[index] = rule(o)
    return mask
