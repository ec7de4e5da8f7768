"""``execution="auto"``: time the candidate paths once per kind of call, keep the fastest.

The candidates are the dense convolution as it is, dense in channels-last layout, and the
active taps (whichever box path :mod:`maskparam.taps.choose` picks for the call). Dense
stays unless another takes at most :data:`MARGIN` of its time, so "auto" never picks a
slower path, up to timing noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["MARGIN", "MAX_ACTIVE", "Runner", "clear", "decide", "measure", "signature"]

MARGIN = 0.9
"""Another path replaces dense only if it takes at most this fraction of dense's time."""

MAX_ACTIVE = 0.75
"""The taps are a candidate only when the mask keeps at most this fraction of the taps."""

Runner = Callable[[str, Tensor, Tensor, "Tensor | None"], Tensor]
"""Runs one candidate (``"dense"``, ``"dense_cl"`` or ``"taps"``) on input, weight, bias."""

# The choice per kind of call (shapes, options, plan, threads): shared by identical layers.
# Bounded: a new entry past the limit drops the oldest.
_DECISIONS: dict[Hashable, str] = {}
_MAX_DECISIONS = 4096


def clear() -> None:
    """Forget every choice made, so that the next call of each kind measures again."""
    _DECISIONS.clear()


def decide(
    key: Hashable,
    candidates: list[str],
    run: Runner,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    backward: bool,
) -> str:
    """The path for calls like this one: measured once per ``key``, then remembered."""
    choice = _DECISIONS.get(key)
    if choice is not None:
        return choice
    choice = "dense"
    if len(candidates) > 1:
        times = measure(candidates, run, input, weight, bias, backward)
        fastest = min(candidates, key=lambda c: times[c])
        if times[fastest] <= MARGIN * times["dense"]:
            choice = fastest
    if len(_DECISIONS) >= _MAX_DECISIONS:
        del _DECISIONS[next(iter(_DECISIONS))]
    _DECISIONS[key] = choice
    return choice


def measure(
    candidates: list[str],
    run: Runner,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    backward: bool,
) -> dict[str, float]:
    """Seconds per call of each candidate path: the minimum of three interleaved rounds."""
    cuda = input.device.type == "cuda"

    def fresh(t: Tensor) -> Tensor:
        return t.detach().requires_grad_(backward and t.requires_grad)

    def once(path: str) -> float:
        with torch.enable_grad() if backward else torch.no_grad():
            x, w = fresh(input), fresh(weight)
            b = None if bias is None else fresh(bias)
            if cuda:
                torch.cuda.synchronize(input.device)
            start = time.perf_counter()
            y = run(path, x, w, b)
            if backward:
                y.backward(y.detach())  # type: ignore[no-untyped-call]
            if cuda:
                torch.cuda.synchronize(input.device)
            return time.perf_counter() - start

    for path in candidates:  # warm-up: allocations, and the conv library's first-call setup
        once(path)
    times: dict[str, list[float]] = {path: [] for path in candidates}
    for _ in range(3):
        for path in candidates:
            times[path].append(once(path))
    return {path: min(ts) for path, ts in times.items()}


def signature(input: Tensor, needs_grad: bool, channels_last: bool) -> tuple[Any, ...]:
    """What a layer's choice depends on besides the layer: the input and the modes."""
    device = input.device.type
    return (
        tuple(input.shape),
        input.dtype,
        input.device,
        channels_last,
        needs_grad,
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
    )
