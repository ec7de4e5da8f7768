"""What several test files share: small masks, optimizers, the functional conv, scripts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
STACKED_PLUS = PLUS.expand(3, 3, 3)

# Optimizers whose state (momentum, running averages) or weight decay would move a masked
# tap if nothing held it.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.1),
}


def functional(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` recomputed with torch.nn.functional and an explicit weight."""
    bias = layer.bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    assert isinstance(layer, nn.modules.conv._ConvNd)
    ndim = len(layer.kernel_size)
    if layer.transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[ndim]
        return fn(
            x,
            weight,
            bias,
            layer.stride,
            layer.padding,
            layer.output_padding,
            layer.groups,
            layer.dilation,
        )
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    padding = layer.padding
    if layer.padding_mode != "zeros":
        pad = [p for p in reversed(layer.padding) for _ in range(2)]  # type: ignore[union-attr]
        x = F.pad(x, pad, mode=layer.padding_mode)
        padding = 0
    return conv(x, weight, bias, layer.stride, padding, layer.dilation, layer.groups)


def full_mask(layer: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask.expand(layer.parametrizations.weight.original.shape)


def train(module: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()


def run_python(script: str, timeout: float = 300) -> list[str]:
    """Run ``script`` in a fresh Python from the repository root; the words it printed.

    For tests that send real signals, which must not reach the test process itself.
    """
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()
