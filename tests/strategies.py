"""Hypothesis strategies: conv layers with every option, and masks that fit a weight."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]

# Any 3x3 kernel mask, every tap off included: what the state machines give their one conv.
kernel_masks_3x3 = st.lists(st.booleans(), min_size=9, max_size=9).map(
    lambda bits: torch.tensor(bits).reshape(3, 3)
)


@dataclass
class ConvCase:
    """A layer and an input that fits it."""

    layer: nn.Module
    x: torch.Tensor

    def __repr__(self) -> str:
        return f"ConvCase({self.layer!r}, x.shape={tuple(self.x.shape)})"


@st.composite
def conv_cases(
    draw: st.DrawFn,
    *,
    ndims: tuple[int, ...] = (1, 2, 3),
    transposed: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> ConvCase:
    """A Conv or ConvTranspose layer with random groups, stride, dilation, padding and mode."""
    ndim = draw(st.sampled_from(ndims))
    if transposed is None:
        transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    in_ch = groups * draw(st.integers(1, 2))
    out_ch = groups * draw(st.integers(1, 2))
    max_k = 3 if ndim == 3 else 4
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    size = tuple(e + draw(st.integers(0, 2)) for e in extent)
    bias = draw(st.booleans())
    if transposed:
        # Keep the output non-empty: (size - 1) * stride - 2 * padding + extent >= 1.
        padding = tuple(
            draw(st.integers(0, min(2, ((s - 1) * st_ + e - 1) // 2)))
            for s, st_, e in zip(size, stride, extent, strict=True)
        )
        output_padding = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
        )
        layer: nn.Module = CONV_TRANSPOSE[ndim](
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=bias,
            dilation=dilation,
        )
    else:
        padding = tuple(draw(st.integers(0, min(2, s - 1))) for s in size)
        mode = draw(st.sampled_from(PADDING_MODES))
        layer = CONV[ndim](
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=mode,
        )
    layer = layer.to(dtype)
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(batch, in_ch, *size, generator=gen, dtype=dtype)
    return ConvCase(layer, x)


def _bools(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """A bool tensor of ``shape``, every entry drawn (so hypothesis can shrink each one)."""
    numel = math.prod(shape)
    bits = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    return torch.tensor(bits, dtype=torch.bool).reshape(shape)


@st.composite
def masks_for(draw: st.DrawFn, *, shape: tuple[int, ...], spatial_dims: int) -> torch.Tensor:
    """A bool mask for a weight of ``shape``: spatial, per leading channel, or per element."""
    kind = draw(st.sampled_from(["spatial", "channel", "full"]))
    if kind == "spatial" and spatial_dims:
        mshape = shape[-spatial_dims:]
    elif kind == "channel":
        mshape = (shape[0],) + (1,) * (len(shape) - 1)
    else:
        mshape = shape
    return _bools(draw, mshape)


@st.composite
def bool_masks(
    draw: st.DrawFn, *, min_dims: int = 1, max_dims: int = 3, max_side: int = 5
) -> torch.Tensor:
    """A bool mask of ``min_dims`` to ``max_dims`` dims, each size in [1, max_side]."""
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    return _bools(draw, shape)


@st.composite
def odd_kernel_sizes(draw: st.DrawFn, *, ndims: tuple[int, ...] = (1, 2, 3)) -> tuple[int, ...]:
    """An odd kernel size per axis, 1 to 7 (1 to 5 in 3-D)."""
    ndim = draw(st.sampled_from(ndims))
    largest = 5 if ndim == 3 else 7
    return tuple(draw(st.sampled_from(range(1, largest + 1, 2))) for _ in range(ndim))


@st.composite
def validities(draw: st.DrawFn, *, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Input validity for an input of ``shape`` ``(N, C, *spatial)``, True at valid input.

    None (all valid), or a bool tensor with one channel or ``C``, per sample or one for the
    whole batch, at a random density.
    """
    kind = draw(st.sampled_from(["none", "single", "multi"]))
    if kind == "none":
        return None
    batch = draw(st.sampled_from([1, shape[0]]))
    channels = 1 if kind == "single" else shape[1]
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.rand((batch, channels, *shape[2:]), generator=gen) < density


@dataclass
class MaskPlan:
    """A small conv model, the mask (or None) each layer gets, and an input that fits."""

    model: nn.Sequential
    masks: dict[str, torch.Tensor | None]
    x: torch.Tensor

    def __repr__(self) -> str:
        shapes = {k: None if m is None else tuple(m.shape) for k, m in self.masks.items()}
        return f"MaskPlan({self.model!r}, masks={shapes}, x.shape={tuple(self.x.shape)})"


@st.composite
def mask_plans(
    draw: st.DrawFn, *, max_layers: int = 3, dtype: torch.dtype = torch.float64
) -> MaskPlan:
    """A stack of 1 to ``max_layers`` Conv2d (kernels 1 to 3 a side, with or without bias)
    with a mask of any form (or None) per layer, at least one of them a mask."""
    count = draw(st.integers(1, max_layers))
    channels = [draw(st.integers(1, 3)) for _ in range(count + 1)]
    layers: list[nn.Module] = []
    masks: dict[str, torch.Tensor | None] = {}
    for i in range(count):
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        conv = nn.Conv2d(channels[i], channels[i + 1], kernel, bias=draw(st.booleans()))
        layers.append(conv)
        shape = tuple(conv.weight.shape)
        masks[str(i)] = draw(st.none() | masks_for(shape=shape, spatial_dims=2))
    if all(mask is None for mask in masks.values()):
        masks["0"] = draw(masks_for(shape=tuple(layers[0].weight.shape), spatial_dims=2))
    model = nn.Sequential(*layers).to(dtype)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    side = 2 * count + draw(st.integers(1, 2))  # Each layer takes at most 2 off each side.
    x = torch.randn(draw(st.integers(1, 2)), channels[0], side, side, generator=gen, dtype=dtype)
    return MaskPlan(model, masks, x)


@st.composite
def sparse_kernel_masks(draw: st.DrawFn, *, kernel_size: tuple[int, ...]) -> torch.Tensor:
    """A bool mask of ``kernel_size``: random taps, or a cross, a ball or a causal half."""
    kind = draw(st.sampled_from(["random", "cross", "ball", "causal"]))
    grids = torch.meshgrid(*[torch.arange(k) - (k - 1) / 2 for k in kernel_size], indexing="ij")
    if kind == "cross":
        return sum((g == 0).int() for g in grids) >= len(grids) - 1
    if kind == "ball":
        return sum(g**2 for g in grids) <= (max(kernel_size) - 1) ** 2 / 4
    if kind == "causal":
        flat = torch.arange(torch.Size(kernel_size).numel()).reshape(kernel_size)
        return flat < draw(st.integers(0, flat.numel()))
    numel = torch.Size(kernel_size).numel()
    bits = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    return torch.tensor(bits, dtype=torch.bool).reshape(kernel_size)


@st.composite
def string_padding_conv_cases(
    draw: st.DrawFn, *, ndims: tuple[int, ...] = (1, 2, 3), dtype: torch.dtype = torch.float64
) -> ConvCase:
    """A Conv with ``padding="same"`` or ``"valid"``: even kernels, dilation, any padding mode."""
    ndim = draw(st.sampled_from(ndims))
    groups = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    size = tuple(
        (k - 1) * d + 1 + draw(st.integers(0, 2)) for k, d in zip(kernel, dilation, strict=True)
    )
    layer = CONV[ndim](
        groups * draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 2)),
        kernel,
        padding=draw(st.sampled_from(["same", "valid"])),
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
    ).to(dtype)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(draw(st.integers(1, 2)), layer.in_channels, *size, generator=gen, dtype=dtype)
    return ConvCase(layer, x)
