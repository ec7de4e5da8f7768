"""The ways one masked conv runs. Each computes the dense convolution, up to rounding.

- ``"dense"``: the layer's own convolution.
- ``"dense_cl"``: the same, in channels-last layout (``execution="auto"`` may pick it).
- ``"kernel"``: the compiled tap kernel (:mod:`maskparam.taps.kernel`), in eager mode.
- ``"kernel_op"``: the same kernel as the custom op ``maskparam::tap_conv``, under
  :func:`torch.compile`.
- ``"fused"``: the boxes on the CPU with a hand-written backward (:mod:`.fused`).
- ``"reference"``: the boxes as ordinary torch operations (:mod:`.reference`).

:func:`maskparam.taps.choose.choose` says which one a call takes; this module only runs them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from maskparam import _compat
from maskparam._forward import dense_forward
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.boxes import Box
from maskparam.taps.choose import box_path
from maskparam.taps.fused import FusedBoxes
from maskparam.taps.memory import is_channels_last, relayout
from maskparam.taps.plan import active_taps, box_call
from maskparam.taps.reference import double_backward, reference_conv

__all__ = ["BOX_PATHS", "PATHS", "run", "run_boxes"]

PATHS = ("dense", "dense_cl", "kernel", "kernel_op", "fused", "reference")
BOX_PATHS = ("kernel", "kernel_op", "fused", "reference")
"""The paths that compute only the active taps."""


def run(
    path: str,
    module: _compat.ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
) -> Tensor:
    """Run ``path`` (one of :data:`PATHS`); ``boxes`` matter only to the box paths."""
    if path == "dense":
        return dense_forward(module, input, weight, bias)
    if path == "dense_cl":
        out_cl = is_channels_last(input) or is_channels_last(weight)
        y = dense_forward(module, relayout(input, True), weight, bias)
        return relayout(y, out_cl)
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # As autocast runs a dense conv: in its lower precision, whatever the path inside.
        dtype = torch.get_autocast_dtype(device)

        def cast_(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

        with torch.autocast(device, enabled=False):
            b = None if bias is None else cast_(bias)
            return run_boxes(module, cast_(input), cast_(weight), b, boxes, path)
    return run_boxes(module, input, weight, bias, boxes, path)


def run_boxes(
    module: _compat.ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
    path: str | None = None,
) -> Tensor:
    """The conv of ``module`` on ``input``, computed box by box.

    ``weight`` must be zero outside the boxes; the result is then the dense convolution.

    Args:
        module: A Conv1d/2d/3d: its stride, padding, dilation, groups and padding mode.
        input: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.
        weight: The masked weight.
        bias: The bias or None.
        boxes: From :func:`~maskparam.taps.decompose` of the weight's active taps, at least
            one.
        path: ``"kernel"``, ``"kernel_op"``, ``"fused"`` or ``"reference"``; by default
            the one the rules of :data:`~maskparam.taps.choose.RULES` pick for this call.

    Returns:
        The output, in the layout the dense convolution gives.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from maskparam.taps import decompose
        >>> conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
        >>> weight = torch.where(plus, torch.ones(1, 1, 3, 3), 0)
        >>> x = torch.arange(9.0).view(1, 1, 3, 3)
        >>> run_boxes(conv, x, weight, None, decompose(plus))
        tensor([[[[ 4.,  7.,  8.],
                  [13., 20., 19.],
                  [16., 25., 20.]]]])
        >>> torch.equal(_, F.conv2d(x, weight, padding=1))
        True
    """
    if path is None:
        path = box_path(module, input, weight, bias, boxes)
    call = box_call(module, input, weight, boxes)
    x, w, plan, out_cl = call.x, call.w, call.plan, call.out_cl
    y: Tensor
    if path in ("kernel", "kernel_op"):
        geo = plan.geometry
        taps = active_taps(boxes, call.one_d)
        offsets, index = tap_kernel.tap_table(taps, tuple(w.shape[2:]), geo.dilation, geo.pad_left)
        if path == "kernel_op":  # a custom op that torch.compile traces as one node
            y = tap_kernel.tap_conv(x, w, bias, offsets, index, list(plan.out_size))
        else:
            grads_graph = functools.partial(double_backward, plan, out_cl)
            y = tap_kernel.TapKernel.apply(  # type: ignore[no-untyped-call]
                x, w, bias, offsets, index, plan.out_size, grads_graph
            )
    elif path == "fused":
        y = FusedBoxes.apply(x, w, bias, plan, out_cl)  # type: ignore[no-untyped-call]
    else:
        y = reference_conv(x, w, bias, plan, out_cl)
    if call.one_d:
        y = y.squeeze(2)
    return y.squeeze(0) if call.unbatched else y
