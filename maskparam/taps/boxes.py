"""The box decomposition: a mask's active taps split exactly into a few dense blocks.

A *box* is a block of kernel taps evenly spaced along each axis (a box with spacing 2 is a
dilated kernel). Each box runs as one ordinary convolution; this module only finds them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_BOXES", "Box", "decompose", "spatial_support"]

MAX_BOXES = 32
"""A mask whose active taps need more boxes than this runs no boxes: too many small convs.

The tap kernel still runs it where it applies; elsewhere it runs dense.
"""


@dataclass(frozen=True)
class Box:
    """A block of kernel taps: ``count[i]`` taps from ``start[i]``, ``step[i]`` apart.

    Example:
        >>> box = Box(start=(1, 0), count=(1, 2), step=(1, 2))
        >>> box.taps()
        [(1, 0), (1, 2)]
    """

    start: tuple[int, ...]
    count: tuple[int, ...]
    step: tuple[int, ...]

    @property
    def size(self) -> int:
        """The number of taps in the box."""
        return math.prod(self.count)

    def slices(self) -> tuple[slice, ...]:
        """One slice per kernel axis that picks the box out of a weight's spatial dims."""
        return tuple(
            slice(a, a + (n - 1) * q + 1, q)
            for a, n, q in zip(self.start, self.count, self.step, strict=True)
        )

    def taps(self) -> list[tuple[int, ...]]:
        """The kernel positions the box covers, in row-major order."""
        axes = [
            range(a, a + (n - 1) * q + 1, q)
            for a, n, q in zip(self.start, self.count, self.step, strict=True)
        ]
        return list(itertools.product(*axes))


def decompose(mask: Tensor, *, max_boxes: int = MAX_BOXES) -> tuple[Box, ...] | None:
    """Split the True entries of a kernel mask exactly into disjoint :class:`Box` es.

    Greedy: the largest box that fits in the taps not yet covered comes first (ties go to
    the smallest total spacing, then the first position), until every active tap is covered.

    Args:
        mask: Bool tensor of the kernel's spatial shape, 1 to 3 dims.
        max_boxes: Give up (return None) when more boxes than this would be needed.

    Returns:
        The boxes, largest first; ``()`` for an all-False mask; None past ``max_boxes``, or
        for a mask too irregular to split in a bounded search (a large random kernel).

    Example:
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
        >>> [(b.start, b.count, b.step) for b in decompose(plus)]
        [((0, 1), (3, 1), (1, 1)), ((1, 0), (1, 2), (1, 2))]
    """
    shape = tuple(int(k) for k in mask.shape)
    # The remaining taps as nested lists over all axes but the last, of bitmasks over it.
    table = _bit_table(mask.detach().to("cpu", torch.bool).tolist(), len(shape))
    progressions = [_progressions(k) for k in shape]
    boxes: list[Box] = []
    budget = [_SEARCH_BUDGET]
    while _any_bit(table):
        if len(boxes) == max_boxes:
            return None
        try:
            box = _largest_box(table, shape, progressions, budget)
        except _OverBudget:
            return None
        for tap in box.taps():
            table = _clear_bit(table, tap)
        boxes.append(box)
    return tuple(boxes)


# Candidate boxes decompose() may examine in all: a few hundred milliseconds at most, and
# far more than any mask that gains from the boxes needs.
_SEARCH_BUDGET = 250_000


class _OverBudget(Exception):
    pass


_Table = Any  # int, or a nested list of ints: the remaining taps, one bitmask per last axis


def _bit_table(values: Any, nd: int) -> _Table:
    if nd == 1:
        return sum(1 << i for i, v in enumerate(values) if v)
    return [_bit_table(v, nd - 1) for v in values]


def _any_bit(table: _Table) -> bool:
    return bool(table) if isinstance(table, int) else any(_any_bit(t) for t in table)


def _max_bits(table: _Table) -> int:
    if isinstance(table, int):
        return table.bit_count()
    return max((_max_bits(t) for t in table), default=0)


def _and(a: _Table, b: _Table) -> _Table:
    return a & b if isinstance(a, int) else [_and(x, y) for x, y in zip(a, b, strict=True)]


def _clear_bit(table: _Table, tap: tuple[int, ...]) -> _Table:
    if len(tap) == 1:
        return int(table) & ~(1 << tap[0])
    table = list(table)
    table[tap[0]] = _clear_bit(table[tap[0]], tap[1:])
    return table


def _progressions(k: int) -> list[tuple[int, int, int]]:
    """Every ``(start, step, count)`` that fits in ``range(k)``: most taps, then smallest step.

    A single tap has step 1.
    """
    out = [(a, 1, 1) for a in range(k)]
    for a in range(k):
        for q in range(1, k):
            for n in range(2, (k - 1 - a) // q + 2):
                out.append((a, q, n))
    out.sort(key=lambda p: (-p[2], p[1], p[0]))
    return out


def _largest_box(
    table: _Table,
    shape: tuple[int, ...],
    progressions: list[list[tuple[int, int, int]]],
    budget: list[int],
) -> Box:
    """The largest box inside the remaining taps, ties broken as :func:`decompose` says."""
    nd = len(shape)
    best_key: tuple[int, ...] | None = None
    best: list[tuple[int, int, int]] = []

    def search(dim: int, chosen: list[tuple[int, int, int]], size: int, sub: _Table) -> None:
        nonlocal best_key, best
        last = dim == nd - 1
        # The most taps the axes after this one can add: every row of the next axes, each
        # with as many taps as the fullest bitmask.
        cap = 1 if last else math.prod(shape[dim + 1 : nd - 1]) * _max_bits(sub)
        for a, q, n in progressions[dim]:
            if best_key is not None and size * n * cap < -best_key[0]:
                # Progressions come most taps first: none further on can do better.
                return
            budget[0] -= 1
            if budget[0] < 0:
                raise _OverBudget
            rows = [sub >> (a + j * q) if last else sub[a + j * q] for j in range(n)]
            if last:
                if not all(r & 1 for r in rows):
                    continue
                box = [*chosen, (a, q, n)]
                key = (
                    -size * n,
                    sum(p[1] for p in box),
                    *(p[0] for p in box),
                    *(p[1] for p in box),
                )
                if best_key is None or key < best_key:
                    best_key, best = key, box
                continue
            inner = rows[0]
            for r in rows[1:]:
                inner = _and(inner, r)
            if _any_bit(inner):
                search(dim + 1, [*chosen, (a, q, n)], size * n, inner)

    search(0, [], 1, table)
    return Box(
        start=tuple(p[0] for p in best),
        count=tuple(p[2] for p in best),
        step=tuple(p[1] for p in best),
    )


def spatial_support(mask: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """The kernel positions that are active for at least one channel pair, as a CPU bool.

    Args:
        mask: A mask that broadcasts to ``weight_shape``.
        weight_shape: ``(C_out, C_in / groups, *kernel_size)``.

    Returns:
        A bool tensor of shape ``weight_shape[2:]``, on the CPU.

    Example:
        >>> per_channel = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
        >>> spatial_support(per_channel.view(2, 1, 3), (2, 4, 3))
        tensor([ True, False,  True])
    """
    full = mask.reshape((1,) * (len(weight_shape) - mask.dim()) + tuple(mask.shape))
    support = full.any(dim=1).any(dim=0)
    return support.expand(tuple(weight_shape[2:])).to("cpu", copy=True).contiguous()
