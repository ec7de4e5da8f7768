"""The box plan: for one conv and one input size, where each box reads and how it pads.

:func:`box_call` sees a call as the box paths and the tap kernel do: batched, and 1-D
lifted to 2-D with a height of one, since 1-D has no channels-last layout. Its
:class:`BoxPlan` (:func:`box_plan`, cached per input size) turns the
:func:`~maskparam.taps.boxes.decompose` of a mask into one convolution per box
(:class:`Step`). :class:`Geometry` is the conv's options per axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from maskparam import _compat
from maskparam.taps.boxes import Box
from maskparam.taps.memory import is_channels_last

__all__ = [
    "BoxCall",
    "BoxPlan",
    "Fold",
    "Geometry",
    "Step",
    "Window",
    "active_taps",
    "box_call",
    "box_plan",
    "count",
    "eager_cached",
    "input_window",
    "lift",
    "output_size",
]


class Fold(NamedTuple):
    """A 3-D box run as a 2-D convolution over a view of the channels-last input.

    ``"depth"``: a box one tap deep, over the full depth, is a 2-D convolution of the
    ``N * D`` planes. ``"plane"``: a box one tap high and wide, over full planes, is a 2-D
    convolution over (depth, height * width). Both are free views of a channels-last
    tensor. The 2-D convolution is never slower here, and for a box spaced out along the
    depth it is several times faster: the conv library computes the weight gradient of a
    3-D kernel dilated in depth on a slow generic path.
    """

    kind: Literal["depth", "plane"]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


class Step(NamedTuple):
    """One box's convolution."""

    padded: bool  # reads the explicitly zero-padded input
    input_index: tuple[slice, ...] | None  # None: all of it (a slice would copy its gradient)
    weight_index: tuple[slice, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    fold: Fold | None  # how the fused CPU path runs a 3-D box, if as a 2-D convolution


class Geometry(NamedTuple):
    """A conv's options per spatial axis, as the boxes and the kernel read them."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    groups: int

    @classmethod
    def of(cls, module: _compat.ConvNd, *, lift: bool) -> Geometry:
        """The options of ``module``; for 1-D lifted to 2-D (``lift``) with a unit first axis.

        With a padding mode other than zeros, the input is padded before the boxes run, so
        they see no padding.
        """
        nd = len(module.kernel_size)
        if module.padding_mode != "zeros":
            left = right = (0,) * nd
        else:  # as torch pads: for "same" with an odd total, the extra zero on the right
            pad = _compat.reversed_padding(module)
            left = tuple(pad[2 * (nd - 1 - i)] for i in range(nd))
            right = tuple(pad[2 * (nd - 1 - i) + 1] for i in range(nd))
        stride, dilation = tuple(module.stride), tuple(module.dilation)
        if lift:
            return cls((1, *stride), (1, *dilation), (0, *left), (0, *right), module.groups)
        return cls(stride, dilation, left, right, module.groups)


class BoxPlan(NamedTuple):
    """The convolutions that compute one conv layer's output box by box, for one input size."""

    steps: tuple[Step, ...]
    pad: tuple[int, ...] | None  # F.pad of the input that padded steps read, if any
    geometry: Geometry
    out_size: tuple[int, ...]


class Window(NamedTuple):
    """Where one box reads its input and how it pads it."""

    padded: bool  # read from the zero-padded input rather than the raw input
    start: tuple[int, ...]
    length: tuple[int, ...]
    padding: tuple[int, ...]  # symmetric padding given to the conv itself


def input_window(
    box: Box, geo: Geometry, in_size: Sequence[int], out_size: Sequence[int]
) -> Window:
    """The input window and padding that make ``box`` produce exactly ``out_size``.

    Output ``o`` of the dense conv reads raw input ``o * stride - pad_left + tap * dilation``.
    The box, a kernel of ``count`` taps at dilation ``step * dilation``, reads the same
    positions from a window that starts ``start * dilation - pad_left`` later. A conv can only
    pad symmetrically, and padding more than needed (then cropping the output) is slow; so a
    box uses the raw input when a symmetric padding gives exactly the right output, and
    otherwise a window of the input padded once, explicitly.
    """
    starts, lengths, pads = [], [], []
    for i, (a, n, q) in enumerate(zip(box.start, box.count, box.step, strict=True)):
        s, d, pl = geo.stride[i], geo.dilation[i], geo.pad_left[i]
        size, out = in_size[i], out_size[i]
        extent = (n - 1) * q * d + 1
        lp = pl - a * d
        start, p = (0, lp) if lp >= 0 else (-lp, 0)
        lo = (out - 1) * s + extent - 2 * p  # window lengths that give `out` outputs
        hi = lo + s - 1
        avail = size - start
        if lo <= avail <= hi:
            length = avail  # to the end: the conv's right padding is the dense padding
        elif p <= s - 1 and max(lo, lo + p) <= min(hi, avail):
            length = lo + p  # cropped, and no read lands in the conv's right padding
        else:
            return _padded_window(box, geo, out_size)
        starts.append(start)
        lengths.append(length)
        pads.append(p)
    return Window(False, tuple(starts), tuple(lengths), tuple(pads))


def _padded_window(box: Box, geo: Geometry, out_size: Sequence[int]) -> Window:
    starts = tuple(a * d for a, d in zip(box.start, geo.dilation, strict=True))
    lengths = tuple(
        (out - 1) * s + (n - 1) * q * d + 1
        for out, s, n, q, d in zip(
            out_size, geo.stride, box.count, box.step, geo.dilation, strict=True
        )
    )
    return Window(True, starts, lengths, (0,) * len(starts))


def count(boxes: tuple[Box, ...]) -> int:
    """The number of taps in ``boxes``."""
    return sum(box.size for box in boxes)


def lift(input: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Input and weight as the boxes see them: batched, and 1-D as 2-D with a height of one.

    2-D, because 1-D has no channels-last layout.
    """
    x = input.unsqueeze(0) if input.dim() == weight.dim() - 1 else input
    if weight.dim() == 3:
        return x.unsqueeze(2), weight.unsqueeze(2)
    return x, weight


def output_size(
    geo: Geometry, in_size: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[int, ...]:
    """The conv's output size per spatial axis."""
    return tuple(
        (size + pl + pr - d * (k - 1) - 1) // s + 1
        for size, pl, pr, d, k, s in zip(
            in_size, geo.pad_left, geo.pad_right, geo.dilation, kernel, geo.stride, strict=True
        )
    )


Fn = TypeVar("Fn", bound=Callable[..., Any])


def eager_cached(maxsize: int) -> Callable[[Fn], Fn]:
    """Cache a function of hashable arguments in eager mode, as :func:`functools.lru_cache`.

    Under :func:`torch.compile` it runs uncached: tracing needs no cache, and warns about one.
    """

    def decorate(fn: Fn) -> Fn:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def pick(*args: Any) -> Any:
            return (fn if torch.compiler.is_compiling() else cached)(*args)

        return cast(Fn, pick)

    return decorate


@eager_cached(maxsize=256)
def active_taps(boxes: tuple[Box, ...], lift: bool) -> tuple[tuple[int, ...], ...]:
    """Every tap of ``boxes``, in order (``lift``: 1-D lifted to 2-D)."""
    taps = sorted(tap for box in boxes for tap in box.taps())
    return tuple((0, *tap) if lift else tuple(tap) for tap in taps)


@eager_cached(maxsize=1024)
def box_plan(
    boxes: tuple[Box, ...],
    geo: Geometry,
    in_size: tuple[int, ...],
    kernel: tuple[int, ...],
    lift: bool,
) -> BoxPlan:
    """Where each box reads and how it pads, for one input size (``lift``: 1-D as 2-D)."""
    if lift:
        boxes = tuple(Box((0, *b.start), (1, *b.count), (1, *b.step)) for b in boxes)
    out_size = output_size(geo, in_size, kernel)
    everything = (slice(None), slice(None))
    padded_size = tuple(
        size + pl + pr for size, pl, pr in zip(in_size, geo.pad_left, geo.pad_right, strict=True)
    )
    steps = []
    for box in boxes:
        win = input_window(box, geo, in_size, out_size)
        window = tuple(slice(a, a + n) for a, n in zip(win.start, win.length, strict=True))
        source = padded_size if win.padded else in_size
        whole = not win.padded and all(
            a == 0 and n == size for a, n, size in zip(win.start, win.length, in_size, strict=True)
        )
        dilation = tuple(d * q for d, q in zip(geo.dilation, box.step, strict=True))
        steps.append(
            Step(
                win.padded,
                None if whole else everything + window,
                everything + box.slices(),
                win.padding,
                dilation,
                _fold(box, win, source, geo.stride, dilation) if len(in_size) == 3 else None,
            )
        )
    pad = None
    if any(step.padded for step in steps):
        pairs = zip(reversed(geo.pad_left), reversed(geo.pad_right), strict=True)
        pad = tuple(p for pair in pairs for p in pair)
    return BoxPlan(tuple(steps), pad, geo, out_size)


class BoxCall(NamedTuple):
    """One call of a conv as the box paths and the tap kernel see it."""

    x: Tensor  # batched, 1-D as 2-D, padded already for a padding mode other than zeros
    w: Tensor  # the masked weight, 1-D as 2-D
    plan: BoxPlan
    out_cl: bool  # whether the output is channels-last, as the dense convolution's would be
    one_d: bool
    unbatched: bool


def box_call(
    module: _compat.ConvNd, input: Tensor, weight: Tensor, boxes: tuple[Box, ...]
) -> BoxCall:
    """``module(input)`` as the boxes see it, and their plan: the one place it is made."""
    one_d = len(module.kernel_size) == 1
    x, w = lift(input, weight)
    if module.padding_mode != "zeros":
        pad = _compat.reversed_padding(module)
        x = F.pad(x, [*pad, 0, 0] if one_d else pad, mode=module.padding_mode)
    # The layout the dense convolution gives: it sees the input after a padding mode's pad.
    out_cl = not one_d and (is_channels_last(x) or is_channels_last(weight))
    geo = Geometry.of(module, lift=one_d)
    plan = box_plan(boxes, geo, tuple(x.shape[2:]), tuple(w.shape[2:]), one_d)
    unbatched = input.dim() == len(module.kernel_size) + 1
    return BoxCall(x, w, plan, out_cl, one_d, unbatched)


def _fold(
    box: Box,
    win: Window,
    source: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Fold | None:
    """How a 3-D box can run as a 2-D convolution on a view of its source, if it can."""

    def full(axis: int) -> bool:  # one tap, unit stride, no padding, the whole source axis
        return (
            box.count[axis] == 1
            and stride[axis] == 1
            and win.padding[axis] == 0
            and win.start[axis] == 0
            and win.length[axis] == source[axis]
        )

    if full(0):
        return Fold("depth", stride[1:], win.padding[1:], dilation[1:])  # type: ignore[arg-type]
    if full(1) and full(2):
        return Fold("plane", (stride[0], 1), (win.padding[0], 0), (dilation[0], 1))
    return None
