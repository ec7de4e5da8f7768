"""Masked convs with a data-dependent bias mode, and the reference they are checked against."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from maskparam.apply import apply_mask, get_mask
from maskparam.partial import partial_conv

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
BOX = torch.ones(3, 3, dtype=torch.bool)
# PixelCNN type A: the taps strictly before the centre in raster order.
TYPE_A = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
MODES = ["valid", "partial"]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference(
    layer: nn.Module, x: torch.Tensor, validity: torch.Tensor | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, output validity, coverage in weight entries) by looping over kernel offsets.

    Written from the definition, independently of the code under test: zero padding for
    every padding mode, single-channel validity broadcast to every input channel.
    """
    assert isinstance(layer, nn.modules.conv._ConvNd)
    ndim = len(layer.kernel_size)
    mask = get_mask(layer).expand(layer.parametrizations.weight.original.shape)
    weight = torch.where(mask, layer.parametrizations.weight.original.detach(), 0)
    n, c_in, *spatial = x.shape
    c_out, groups = weight.shape[0], layer.groups
    cin_g, cout_g = c_in // groups, c_out // groups
    if validity is None:
        validity = torch.ones(n, 1, *spatial, dtype=torch.bool)
    v = validity.expand(n, c_in, *spatial)
    pad = [p for p in reversed(layer.padding) for _ in range(2)]  # type: ignore[union-attr]
    xv = F.pad(torch.where(v, x, 0), pad)
    vp = F.pad(v.to(x.dtype), pad)
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st_ + 1
        for s, p, d, k, st_ in zip(
            spatial, layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True
        )
    ]
    raw = torch.zeros(n, c_out, *size, dtype=x.dtype)
    cov = torch.zeros(n, c_out, *size, dtype=x.dtype)
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        window = tuple(
            slice(o * d, o * d + st_ * (m - 1) + 1, st_)
            for o, d, st_, m in zip(offset, layer.dilation, layer.stride, size, strict=True)
        )
        patch_x = xv[(..., *window)]
        patch_v = vp[(..., *window)]
        for o in range(c_out):
            group = slice((o // cout_g) * cin_g, (o // cout_g + 1) * cin_g)
            w = weight[(o, slice(None), *offset)]
            k = mask[(o, slice(None), *offset)].to(x.dtype)
            raw[:, o] += torch.einsum("c,nc...->n...", w, patch_x[:, group])
            cov[:, o] += torch.einsum("c,nc...->n...", k, patch_v[:, group])
    total = mask.flatten(1).sum(1).to(x.dtype).view(1, -1, *[1] * ndim)
    valid = cov > 0
    bias = 0 if layer.bias is None else layer.bias.detach().view(1, -1, *[1] * ndim)
    if mode == "partial":
        out = torch.where(valid, raw * total / cov.clamp_min(1) + bias, 0)
    else:
        out = raw + torch.where(valid, bias, 0)
    return out, valid, cov


def masked(layer: nn.Module, mask: torch.Tensor | list[int], mode: str) -> nn.Module:
    return apply_mask(layer, mask, bias_mode=mode)  # type: ignore[arg-type]


def masked_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The standard masked conv: what the layer computes with bias_mode='keep'."""
    assert isinstance(layer, nn.modules.conv._ConvNd)
    fn = FCONV[len(layer.kernel_size)]
    return fn(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


class Functional(nn.Module):
    """partial_conv as a module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, conv: nn.Module, validity: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.validity = validity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return partial_conv(self.conv, x, self.validity)[0]
