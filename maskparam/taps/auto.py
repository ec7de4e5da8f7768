"""``execution="auto"``: which paths to time for a call, how to time them, and the verdict.

The candidates are the dense convolution as it is, dense in channels-last layout, and the
active taps (whichever box path :mod:`maskparam.taps.choose` picks for the call). Dense
stays unless another takes at most :data:`MARGIN` of its time, so "auto" never picks a
slower path, up to timing noise. The layer's :class:`~maskparam.taps.TapExecution` times
its calls here and records the verdict; the rules only read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from maskparam.taps.memory import is_channels_last

__all__ = [
    "MARGIN",
    "MAX_ACTIVE",
    "Runner",
    "Trial",
    "candidates",
    "clear",
    "decide",
    "measure",
    "signature",
]

MARGIN = 0.9
"""Another path replaces dense only if it takes at most this fraction of dense's time."""

MAX_ACTIVE = 0.75
"""The taps are a candidate only when the mask keeps at most this fraction of the taps."""

Runner = Callable[[str, Tensor, Tensor, "Tensor | None"], Tensor]
"""Runs one candidate (``"dense"``, ``"dense_cl"`` or ``"taps"``) on input, weight, bias."""


class Trial(NamedTuple):
    """What :func:`decide` times: a runner of the candidates, and one call's tensors."""

    run: Runner
    input: Tensor
    weight: Tensor
    bias: Tensor | None
    backward: bool  # time the backward too: the call records a graph


# The verdict per kind of call (shapes, options, boxes, threads): shared by identical
# layers. Bounded: a new entry past the limit drops the oldest.
_DECISIONS: dict[Hashable, str] = {}
_MAX_DECISIONS = 4096


def clear() -> None:
    """Forget every verdict, so that the next call of each kind is timed again."""
    _DECISIONS.clear()


def signature(input: Tensor, needs_grad: bool) -> tuple[Any, ...]:
    """What a layer's choice depends on besides the layer: the input and the modes."""
    device = input.device.type
    return (
        tuple(input.shape),
        input.dtype,
        input.device,
        is_channels_last(input),
        needs_grad,
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
    )


def candidates(module: nn.Module, input: Tensor, active_fraction: float) -> tuple[str, ...]:
    """The paths worth timing for ``module(input)``: dense always."""
    kernel_size = tuple(getattr(module, "kernel_size", ()))
    out = ["dense"]
    batched = input.dim() == len(kernel_size) + 2
    if batched and len(kernel_size) >= 2 and not is_channels_last(input):
        out.append("dense_cl")
    if active_fraction <= MAX_ACTIVE:
        out.append("taps")
    return tuple(out)


def decide(key: Hashable, paths: tuple[str, ...], trial: Trial) -> str:
    """The path for calls like ``trial``: timed once per ``key``, then remembered."""
    choice = _DECISIONS.get(key)
    if choice is not None:
        return choice
    choice = "dense"
    if len(paths) > 1:
        times = measure(list(paths), *trial)
        fastest = min(paths, key=lambda c: times[c])
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
