"""The fused CPU path: the boxes with a hand-written backward that passes over memory less.

Against the reference path (:mod:`maskparam.taps.reference`): every box after the first
adds its convolution into the sum as oneDNN writes it, the input and the gradient change
layout once each, and the backward adds the boxes' input gradients straight into one sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from maskparam import _compat
from maskparam.taps.memory import (
    SCRATCH,
    copy_layout,
    is_channels_last,
    memory_format,
    to_channels_last_scratch,
)
from maskparam.taps.plan import BoxPlan, Step
from maskparam.taps.reference import CONV, double_backward

__all__ = ["FusedBoxes"]


class ConvArgs(NamedTuple):
    """Stride, padding and dilation of one convolution that a step runs."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


def _conv_add(out: Tensor, x: Tensor, w: Tensor, args: ConvArgs, groups: int) -> None:
    _compat.conv_add_(out, x, w, args.stride, args.padding, args.dilation, groups)


class FusedBoxes(torch.autograd.Function):
    """The boxes on the CPU, with a hand-written backward that passes over memory less.

    Against running the boxes as ordinary torch operations: every box after the first
    adds its convolution into the sum as the conv library writes it (no separate pass to
    sum the boxes); the input and the gradient change layout once each; the backward adds
    the boxes' input gradients, transposed convolutions, straight into one sum, and runs
    each box's weight gradient on the view the conv library is fastest on (or, for a box
    one tap high and wide, as matrix products). Temporaries that change layout afterwards
    live in ``SCRATCH``. A double backward differentiates the reference path
    (:func:`~maskparam.taps.reference.double_backward`) instead.

    Apply as ``FusedBoxes.apply(x, w, bias, plan, out_cl)``: the batched (padded, lifted)
    input, the masked weight, the bias or None, the box plan, and whether the output is
    channels-last.
    """

    # The ctx-first form: a separate setup_context makes every call bind its signature.
    @staticmethod
    def forward(  # noqa: D102 (see the class)
        ctx: Any,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        plan: BoxPlan,
        out_cl: bool,
    ) -> Tensor:
        ctx.plan, ctx.out_cl = plan, out_cl
        groups = plan.geometry.groups
        x_cl = x.contiguous(memory_format=memory_format(x, True))
        ctx.save_for_backward(x, w, bias, None if x_cl is x else x_cl)
        y: Tensor | None = None
        own_y = not out_cl and _compat.can_add_conv_in_place(x)
        if own_y:  # the sum is a temporary: a scratch buffer holding the bias, or zeros
            y = SCRATCH.take((x.shape[0], w.shape[0], *plan.out_size), x.dtype, channels_last=True)
            if bias is None:
                y.zero_()
            else:
                y.copy_(bias.view(-1, *[1] * len(plan.out_size)).expand(y.shape[1:]))
        for step in plan.steps:
            src = _fold_view(step, _read_window(step, x_cl, plan.pad))
            w_box = _box_weight(step, w)
            args = _step_args(step, plan)
            if y is None:
                part = CONV[src.dim() - 2](src, w_box, bias, *args, groups)
                y = _unfold(step, part, (x.shape[0], w.shape[0], *plan.out_size))
                # Channels-last, so that every later box adds into a view of it (the conv
                # of some dtypes, such as float64, gives a contiguous output).
                y = copy_layout(y, True)
            else:
                _conv_add(_fold_view(step, y), src, w_box, args, groups)
            del src  # a window, perhaps: free it before the next box makes its own
        assert y is not None
        out = copy_layout(y, out_cl)
        if own_y:
            SCRATCH.give(y)
            if out is y:  # one channel or one position: channels-last is contiguous too
                out = y.clone()
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, w, bias, saved_cl = ctx.saved_tensors
        plan: BoxPlan = ctx.plan
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: a graph of the gradients is wanted
            return (*double_backward(plan, ctx.out_cl, needs, grad, x, w, bias), None, None)
        need_x, need_w, need_b = needs
        groups = plan.geometry.groups
        x_cl = x if saved_cl is None else saved_cl
        g, own_g = to_channels_last_scratch(grad)
        grad_w = torch.zeros_like(w) if need_w else None
        # The input gradient, channels-last: a scratch buffer when it changes layout after.
        grad_x: Tensor | None = None
        own_gx = need_x and not is_channels_last(x) and _compat.can_add_conv_in_place(x)
        if own_gx:
            grad_x = SCRATCH.take(x.shape, x.dtype, channels_last=True).zero_()
        for step in plan.steps:
            # The input gradient of a box is a transposed convolution, but for a stride.
            flipped = None
            if need_x:
                kernel = _box_weight(step, w).shape[2:]
                flipped = _transposed_args(_step_args(step, plan), kernel)
            by_taps = need_w and _by_depth_taps(step, plan, x.dtype)
            if by_taps:
                grad_w[step.weight_index] = _depth_tap_grads(step, plan, g, x_cl)  # type: ignore[index]
            conv_w, conv_x = need_w and not by_taps, need_x and flipped is None
            if conv_w or conv_x:
                # The conv backward, on the view its weight gradient is fastest on.
                by_weight = _weight_grad_step(step)
                window = _read_window(by_weight, x_cl, plan.pad)
                args = _step_args(by_weight, plan)
                gx, gw = _compat.convolution_backward(
                    _fold_view(by_weight, g),
                    _fold_view(by_weight, window),
                    _box_weight(by_weight, w),
                    args,
                    groups,
                    (conv_x, conv_w),
                )
                if conv_w:
                    assert gw is not None
                    grad_w[step.weight_index] = _unfold_weight(by_weight, gw)  # type: ignore[index]
                if conv_x:
                    assert gx is not None
                    if grad_x is None:
                        grad_x = torch.zeros_like(x_cl)
                    gx = _unfold(by_weight, gx, tuple(window.shape))
                    _add_overlap(step, grad_x, gx, plan.pad)
                del window, gx  # before the next box makes its own
            if flipped is None:
                continue
            g_box = _fold_view(step, g)
            w_t = _transposed_weight(_box_weight(step, w), groups)
            if step.input_index is None:  # the box reads all of the input: add in place
                if grad_x is None:
                    gx = CONV[g_box.dim() - 2](g_box, w_t, None, *flipped, groups)
                    grad_x = copy_layout(_unfold(step, gx, tuple(x.shape)), True)
                else:
                    _conv_add(_fold_view(step, grad_x), g_box, w_t, flipped, groups)
                continue
            # A window (perhaps reaching into the padding): the part in the input counts.
            gx = CONV[g_box.dim() - 2](g_box, w_t, None, *flipped, groups)
            gx = _unfold(step, gx, _read_window_shape(step, x_cl, plan.pad))
            if grad_x is None:
                grad_x = torch.zeros_like(x_cl)
            _add_overlap(step, grad_x, gx, plan.pad)
            del gx
        # A sum of its own: the conv library's weight gradient is slower with a bias one.
        grad_b = grad.sum(dim=[0, *range(2, grad.dim())]) if need_b else None
        grad_input = None
        if grad_x is not None:
            grad_input = copy_layout(grad_x, is_channels_last(x))
            if own_gx and grad_input is grad_x:  # as for the output in the forward
                grad_input = grad_x.clone()
        SCRATCH.give(g if own_g else None, grad_x if own_gx else None)
        return grad_input, grad_w, grad_b, None, None


def _read_window(step: Step, x: Tensor, pad: tuple[int, ...] | None) -> Tensor:
    """The part of the channels-last input that ``step`` reads, in the input's dims.

    A window of the zero-padded input is padded (and cropped) out of ``x`` directly, by
    itself: no padded copy of all of the input, and no copy of a strided window of it.
    """
    if step.input_index is None:
        return x
    if not step.padded:
        return x[step.input_index]
    assert pad is not None
    return F.pad(x, _window_pad(step, pad, x.shape)).contiguous(
        memory_format=memory_format(x, True)
    )


def _read_window_shape(step: Step, x: Tensor, pad: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of :func:`_read_window`, without making the window."""
    if not step.padded:
        return tuple(_read_window(step, x, pad).shape)  # a view
    assert pad is not None
    return (*x.shape[:2], *(length for _, length, _ in _window_ranges(step, pad, x.shape)))


def _window_pad(step: Step, pad: tuple[int, ...], shape: Sequence[int]) -> list[int]:
    """The ``F.pad`` of the input that gives ``step``'s window of the padded input."""
    out = []
    for start, window, size in reversed(_window_ranges(step, pad, shape)):
        out += [-start, start + window - size]  # F.pad order: the last axis first
    return out


def _window_ranges(
    step: Step, pad: tuple[int, ...], shape: Sequence[int]
) -> list[tuple[int, int, int]]:
    """Per spatial axis of a padded step: (window start in the input, length, input size)."""
    ranges = []
    for axis in range(2, len(shape)):
        window = step.input_index[axis]  # type: ignore[index]
        left = pad[2 * (len(shape) - 1 - axis)]
        ranges.append((window.start - left, window.stop - window.start, shape[axis]))
    return ranges


def _add_overlap(step: Step, grad_x: Tensor, grad: Tensor, pad: tuple[int, ...] | None) -> None:
    """Add ``grad``, the gradient of ``step``'s window, into ``grad_x`` where they overlap.

    A window of the padded input may reach into the padding, whose gradient goes nowhere.
    """
    if step.input_index is None:
        grad_x.add_(grad)
    elif not step.padded:
        grad_x[step.input_index].add_(grad)
    else:
        assert pad is not None
        target, source = [slice(None)] * 2, [slice(None)] * 2
        for start, length, size in _window_ranges(step, pad, grad_x.shape):
            lo, hi = max(0, start), min(size, start + length)
            target.append(slice(lo, hi))
            source.append(slice(lo - start, hi - start))
        grad_x[tuple(target)].add_(grad[tuple(source)])


def _fold_view(step: Step, t: Tensor) -> Tensor:
    """``t`` (N, C, D, H, W) as the 2-D tensor ``step.fold`` runs on.

    A view, not a copy, for a channels-last ``t`` that spans the folded axes.
    """
    if step.fold is None:
        return t
    if step.fold.kind == "depth":
        n, c, d, h, w = t.shape
        return t.transpose(1, 2).reshape(n * d, c, h, w)
    return t.flatten(3)


def _unfold(step: Step, t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`_fold_view`: ``t`` as the 5-D tensor of ``shape``."""
    if step.fold is None:
        return t
    n, c, d, h, w = shape
    if step.fold.kind == "depth":
        return t.view(n, d, c, h, w).transpose(1, 2)
    return t.view(*t.shape[:3], h, w)


def _by_depth_taps(step: Step, plan: BoxPlan, dtype: torch.dtype) -> bool:
    """Whether :func:`_depth_tap_grads` computes ``step``'s weight gradient."""
    return (
        step.fold is not None
        and step.fold.kind == "plane"
        and step.fold.stride[0] == 1
        and plan.geometry.groups == 1
        and dtype in (torch.float32, torch.float64)  # a half-precision sum would round
    )


def _depth_tap_grads(step: Step, plan: BoxPlan, g: Tensor, x: Tensor) -> Tensor:
    """The weight gradient of a box one tap high and wide, tap by tap, as matrix products.

    Each tap along the depth meets the output planes at one depth offset: its gradient is
    a sum over (output plane, input plane shifted by that offset) of (C_out, C_in) products,
    one batched matrix product over free views of channels-last ``g`` and ``x``. The conv
    library's weight gradient of such a thin kernel is slower, as much as twice.
    """
    assert step.fold is not None
    window = _read_window(step, x, plan.pad)
    n, c_in, d_in = window.shape[:3]
    c_out, d_out = g.shape[1], g.shape[2]
    xs, gs = window.movedim(1, -1), g.movedim(1, -1)  # (N, D, H, W, C)
    grads = []
    for j in range(_taps_along(step, 2)):
        shift = j * step.fold.dilation[0] - step.fold.padding[0]  # input plane - output plane
        lo, hi = max(0, -shift), min(d_out, d_in - shift)
        if hi <= lo:  # this tap only ever meets the padding
            grads.append(g.new_zeros(c_out, c_in))
            continue
        gv = gs[:, lo:hi].reshape(n, -1, c_out)
        xv = xs[:, lo + shift : hi + shift].reshape(n, -1, c_in)
        grads.append(torch.bmm(gv.transpose(1, 2), xv).sum(0))
    return torch.stack(grads, -1)[..., None, None]


def _taps_along(step: Step, axis: int) -> int:
    """The number of taps of ``step``'s box along weight ``axis``."""
    window: slice = step.weight_index[axis]
    return len(range(window.start, window.stop, window.step))


def _weight_grad_step(step: Step) -> Step:
    """``step``, run as 3-D for its weight gradient unless the fold is faster for that too.

    The conv library computes the weight gradient of a (depth, height * width) kernel
    more slowly than that of the 3-D kernel, unless the kernel is dilated in depth.
    """
    if step.fold is not None and step.fold.kind == "plane" and step.fold.dilation[0] == 1:
        return step._replace(fold=None)
    return step


def _box_weight(step: Step, w: Tensor) -> Tensor:
    box = w[step.weight_index]
    if step.fold is None:
        return box
    return box[:, :, 0] if step.fold.kind == "depth" else box[:, :, :, 0]


def _unfold_weight(step: Step, gw: Tensor) -> Tensor:
    if step.fold is None:
        return gw
    return gw.unsqueeze(2) if step.fold.kind == "depth" else gw.unsqueeze(3)


def _step_args(step: Step, plan: BoxPlan) -> ConvArgs:
    """Stride, padding and dilation of the convolution that runs ``step``."""
    if step.fold is None:
        return ConvArgs(plan.geometry.stride, step.padding, step.dilation)
    return ConvArgs(step.fold.stride, step.fold.padding, step.fold.dilation)


def _transposed_args(args: ConvArgs, kernel: Sequence[int]) -> ConvArgs | None:
    """The arguments of the convolution whose output is the input gradient, if there is one.

    With unit stride, the input gradient of ``conv(x, w, padding=p, dilation=d)`` is
    ``conv(grad, w flipped, padding=d * (k - 1) - p, dilation=d)``, channels swapped; None
    with a stride, or where that padding would be negative.
    """
    stride, padding, dilation = args
    if any(s != 1 for s in stride):
        return None
    pads = tuple(d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding, strict=True))
    if min(pads) < 0:
        return None
    return ConvArgs(stride, pads, dilation)


def _transposed_weight(w: Tensor, groups: int) -> Tensor:
    """The weight of the convolution :func:`_transposed_args` describes."""
    c_out, c_in = w.shape[0] // groups, w.shape[1]
    kernel = tuple(w.shape[2:])
    t = w.reshape(groups, c_out, c_in, *kernel).transpose(1, 2)
    return t.reshape(groups * c_in, c_out, *kernel).flip(list(range(2, w.dim())))
