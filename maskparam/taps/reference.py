"""The reference path: the boxes as ordinary differentiable torch operations.

It runs anywhere torch runs a convolution (CPU, CUDA, under :func:`torch.compile`, under
forward-mode AD) and differentiates any number of times; the faster paths compare against
it in the tests, and differentiate it for a double backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from maskparam.taps.memory import relayout
from maskparam.taps.plan import BoxPlan

__all__ = ["composite_grads", "run_reference"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_reference(
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
    conv = _CONV[x.dim() - 2]
    y: Tensor | None = None
    for step in plan.steps:
        src = padded if step.padded else x
        assert src is not None
        part = conv(
            src if step.input_index is None else src[step.input_index],
            w[step.weight_index],
            bias if y is None else None,
            plan.stride,
            step.padding,
            step.dilation,
            plan.groups,
        )
        # The conv backward needs only its inputs, so summing in place is safe for autograd.
        # Dropping each part before the next conv lets that conv reuse its memory.
        y = part if y is None else y.add_(part)
        del part
    assert y is not None
    return relayout(y, out_cl)


def composite_grads(
    ctx: Any, grad: Tensor, x: Tensor, w: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The gradients of :func:`run_reference`, as a graph to differentiate again.

    For the double backward of a path with a hand-written backward: ``ctx`` carries
    ``needs_input_grad`` and ``ctx.composite(x, w, bias, ctx.layout, ctx.out_cl)``, the
    reference on the same plan.
    """
    needs = ctx.needs_input_grad[:3]
    inputs = [t for t, need in zip((x, w, bias), needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        y = ctx.composite(x, w, bias, ctx.layout, ctx.out_cl)
    grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True, allow_unused=True))
    return (*(next(grads) if need else None for need in needs), None, None, None)
