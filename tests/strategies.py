"""Hypothesis strategies: conv layers with every option, and masks that fit a weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


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
    numel = 1
    for s in mshape:
        numel *= s
    bits = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    return torch.tensor(bits, dtype=torch.bool).reshape(mshape)
