"""The reference path: the boxes as ordinary differentiable torch operations.

It runs anywhere torch runs a convolution (CPU, CUDA, under :func:`torch.compile`, under
forward-mode AD) and differentiates any number of times; the faster paths compare against
it in the tests, and differentiate it for a double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from maskparam.taps.memory import relayout
from maskparam.taps.plan import BoxPlan

__all__ = ["CONV", "double_backward", "reference_conv"]

CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
"""The functional convolution per number of spatial dims."""


def reference_conv(
    x: Tensor, w: Tensor, bias: Tensor | None, plan: BoxPlan, out_cl: bool
) -> Tensor:
    """The conv as the sum of one ordinary convolution per box.

    Args:
        x: Batched input, padded already for a padding mode other than zeros.
        w: The masked weight (1-D lifted to 2-D, like ``x``).
        bias: The bias or None.
        plan: From :func:`~maskparam.taps.plan.box_plan`.
        out_cl: Whether the output is channels-last.

    Returns:
        The output, channels-last if ``out_cl``, else contiguous.
    """
    x = relayout(x, True)
    padded = None if plan.pad is None else F.pad(x, plan.pad)
    conv = CONV[x.dim() - 2]
    geo = plan.geometry
    y: Tensor | None = None
    for step in plan.steps:
        src = padded if step.padded else x
        assert src is not None
        part = conv(
            src if step.input_index is None else src[step.input_index],
            w[step.weight_index],
            bias if y is None else None,
            geo.stride,
            step.padding,
            step.dilation,
            geo.groups,
        )
        # The conv backward needs only its inputs, so summing in place is safe for autograd.
        # Dropping each part before the next conv lets that conv reuse its memory.
        y = part if y is None else y.add_(part)
        del part
    assert y is not None
    return relayout(y, out_cl)


def double_backward(
    plan: BoxPlan,
    out_cl: bool,
    needs: Sequence[bool],
    grad: Tensor,
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of :func:`reference_conv` that ``needs`` asks for, as a graph.

    For the double backward of a path with a hand-written backward: its gradients, made
    by the reference on the same plan, so that they differentiate again.
    """
    inputs = [t for t, need in zip((x, w, bias), needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        y = reference_conv(x, w, bias, plan, out_cl)
    grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True, allow_unused=True))
    gx, gw, gb = (
        next(grads) if need and t is not None else None
        for t, need in zip((x, w, bias), needs, strict=True)
    )
    return gx, gw, gb
