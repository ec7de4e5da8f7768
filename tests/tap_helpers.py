"""What the tests of maskparam.taps share: masks, twin layers, runs and comparisons."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from maskparam.apply import apply_mask
from maskparam.taps import Box
from maskparam.taps import kernel as tap_kernel

needs_kernel = pytest.mark.skipif(
    tap_kernel.library() is None, reason=f"no tap kernel here: {tap_kernel.status()}"
)
"""Skips a test, or a module (``pytestmark = needs_kernel``), where the tap kernel does not run."""

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
FALLBACK = "falls back to the dense convolution"


def cross3d() -> torch.Tensor:
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[1, 1, :] = mask[1, :, 1] = mask[:, 1, 1] = True
    return mask


def ball(radius: int, ndim: int = 3) -> torch.Tensor:
    axis = torch.arange(-radius, radius + 1)
    grids = torch.meshgrid(*[axis] * ndim, indexing="ij")
    return sum(g**2 for g in grids) <= radius**2


def causal_type_a(k: int = 7) -> torch.Tensor:
    mask = torch.zeros(k, k, dtype=torch.bool)
    mask[: k // 2] = True
    mask[k // 2, : k // 2] = True
    return mask


def covered(boxes: tuple[Box, ...]) -> list[tuple[int, ...]]:
    return [tap for box in boxes for tap in box.taps()]


@contextlib.contextmanager
def kernel_off() -> Iterator[None]:
    """Run as on a machine where the compiled kernel is unavailable: the boxes only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASKPARAM_TAP_KERNEL", "0")
        tap_kernel.clear()
        try:
            yield
        finally:
            patch.undo()
            tap_kernel.clear()


def twins(layer: nn.Module, mask: torch.Tensor, execution: str) -> tuple[nn.Module, nn.Module]:
    """(dense, other): the same layer masked twice, the second with ``execution``."""
    dense = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-zero masks are allowed
        apply_mask(dense, mask)
        apply_mask(layer, mask, execution=execution)
    return dense, layer


def run(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Output and gradients of input, stored weight and bias after one backward."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(torch.ones_like(out) if grad is None else grad)
    result = {"out": out.detach(), "input": x.grad}
    result["weight"] = layer.parametrizations.weight.original.grad
    if layer.bias is not None:
        result["bias"] = layer.bias.grad
    return result


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "unbatched":
        return x[0]
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x


def run_some(layer: nn.Module, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Output, and the gradients in ``wanted`` (input, weight, bias) with the rest frozen."""
    x = x.detach().clone().requires_grad_("input" in wanted)
    weight = layer.parametrizations.weight.original
    weight.requires_grad_("weight" in wanted)
    if layer.bias is not None:
        layer.bias.requires_grad_("bias" in wanted)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    result = {"out": out.detach()}
    if out.requires_grad:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        out.backward(grad)
        result |= {"input": x.grad, "weight": weight.grad}
        if layer.bias is not None:
            result["bias"] = layer.bias.grad
    return result


def layouts(t: torch.Tensor) -> tuple[bool, bool]:
    """Whether ``t`` is contiguous, and whether it is channels-last."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t.is_contiguous(), fmt is not None and t.is_contiguous(memory_format=fmt)
