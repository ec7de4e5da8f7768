"""Memory formats: channels-last and contiguous copies, and the scratch buffers they reuse.

The box paths run in channels-last layout, while the dense convolution keeps the input's
layout; the copies between the two, and their reverse in the backward, are here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from maskparam import _compat

__all__ = [
    "SCRATCH",
    "Scratch",
    "copy_layout",
    "empty_cache",
    "is_channels_last",
    "memory_format",
    "relayout",
    "to_channels_last_scratch",
]


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is channels-last (4-D or 5-D), and not also contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def memory_format(t: Tensor, channels_last: bool) -> torch.memory_format:
    """Channels-last for ``t``'s number of dims (contiguous for those that have none)."""
    if not channels_last or t.dim() not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


def copy_layout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in channels-last (or contiguous) layout: ``t`` itself if it is already."""
    fmt = memory_format(t, channels_last)
    if t.is_contiguous(memory_format=fmt):
        return t
    if channels_last or t.device.type != "cpu" or not is_channels_last(t) or t.shape[1] <= 8:
        return t.contiguous(memory_format=fmt)
    return _to_contiguous(t, torch.empty(t.shape, dtype=t.dtype, device=t.device))


def _to_contiguous(t: Tensor, out: Tensor) -> Tensor:
    """Copy channels-last ``t`` into contiguous ``out``, a few cache-sized blocks at a time.

    Channels-last to contiguous is, per sample, a (spatial, C) to (C, spatial) transpose.
    Torch's strided copy reads a whole column of C-strided values per channel, which
    thrashes the cache, several times slower than this: through a staging buffer of shape
    (N, spatial / 32, C, 32), it reads each cache line once and writes runs of 32 values.
    """
    n, c = t.shape[:2]
    spatial = math.prod(t.shape[2:])
    src = t.permute(0, *range(2, t.dim()), 1).reshape(n, spatial, c)
    flat = out.view(n, c, spatial)
    blocks = spatial // _RUN
    per_chunk = max(1, min(blocks, _STAGE // max(1, n * c * _RUN)))
    stage = SCRATCH.take((n, per_chunk, c, _RUN), t.dtype, channels_last=False)
    for first in range(0, blocks, per_chunk):
        count = min(per_chunk, blocks - first)
        lo, hi = first * _RUN, (first + count) * _RUN
        staged = stage[:, :count]
        staged.copy_(src[:, lo:hi].view(n, count, _RUN, c).transpose(2, 3))
        flat[:, :, lo:hi].view(n, c, count, _RUN).copy_(staged.transpose(1, 2))
    SCRATCH.give(stage)
    if blocks * _RUN < spatial:
        flat[:, :, blocks * _RUN :].copy_(src[:, blocks * _RUN :].transpose(1, 2))
    return out


_RUN = 32  # spatial positions per run in the channels-last to contiguous copy
_STAGE = 1 << 18  # elements staged at a time: 1 MiB in float32, which stays in the L2 cache


class Scratch:
    """Large temporary buffers of the fused CPU path, kept from one call to the next.

    The allocator (glibc) returns large freed blocks to the OS, so a fresh buffer of tens
    of MiB costs a page fault per 4 KiB when first written, as much as a pass over the
    buffer or more; the fused path's temporaries (input and gradient in channels-last
    layout, the sum of the boxes before it changes layout) would pay that on every call.
    A call takes its buffers here and gives them back before it returns, so a buffer is
    only ever in one call's hands, and the scratch holds, between calls, about what one
    call uses at once: at most ``keep`` buffers, the largest.

    Args:
        keep: The most buffers kept between calls.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._free: list[Tensor] = []  # flat buffers, smallest first
        self._lock = threading.Lock()

    def take(self, shape: Sequence[int], dtype: torch.dtype, *, channels_last: bool) -> Tensor:
        """An uninitialized CPU tensor of ``shape``, channels-last or contiguous."""
        numel = math.prod(shape)
        flat = None
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.dtype == dtype and buffer.numel() >= numel:
                    flat = self._free.pop(i)
                    break
        if flat is None:
            # A plain tensor even under inference mode: it is written in place later on.
            with torch.inference_mode(False):
                flat = torch.empty(numel, dtype=dtype)
        if not channels_last or len(shape) not in (4, 5):
            return flat[:numel].view(tuple(shape))
        n, c, *spatial = shape
        return flat[:numel].view(n, *spatial, c).movedim(-1, 1)

    def give(self, *tensors: Tensor | None) -> None:
        """Give back tensors from :meth:`take` (None is skipped); keep the largest buffers."""
        with self._lock:
            for t in tensors:
                buffer = None if t is None else _compat.view_base(t)
                if buffer is not None and all(b is not buffer for b in self._free):
                    self._free.append(buffer)
            self._free.sort(key=Tensor.numel)
            del self._free[: max(0, len(self._free) - self.keep)]

    def __len__(self) -> int:
        """The number of buffers kept."""
        with self._lock:
            return len(self._free)

    def clear(self) -> None:
        """Drop every buffer kept."""
        with self._lock:
            self._free.clear()


SCRATCH = Scratch(keep=6)


def to_channels_last_scratch(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` in channels-last layout, and whether that is a scratch copy to give back."""
    if t.is_contiguous(memory_format=memory_format(t, True)):
        return t, False
    buffer = SCRATCH.take(t.shape, t.dtype, channels_last=True)
    return buffer.copy_(t), True


def relayout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in channels-last (or contiguous) layout, with a backward that does the reverse.

    Torch's strided copy from channels-last to contiguous is several times slower than
    :func:`copy_layout`, and autograd would run it for every box.
    """
    if t.is_contiguous(memory_format=memory_format(t, channels_last)):
        return t
    if torch.compiler.is_compiling() or t.dim() not in (4, 5) or _compat.forward_ad_level() >= 0:
        # Tracing needs no faster copy; forward-mode AD needs ops with a forward derivative.
        return t.contiguous(memory_format=memory_format(t, channels_last))
    out: Tensor = _Relayout.apply(t, channels_last)  # type: ignore[no-untyped-call]
    return out


class _Relayout(torch.autograd.Function):
    # The ctx-first form: a separate setup_context makes every call bind its signature.
    @staticmethod
    def forward(ctx: Any, t: Tensor, channels_last: bool) -> Tensor:
        ctx.input_channels_last = is_channels_last(t)
        return copy_layout(t, channels_last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return relayout(grad, ctx.input_channels_last), None


def empty_cache() -> None:
    """Free the buffers that ``execution="taps"`` keeps between calls on the CPU.

    With an input or gradient that is not channels-last, the taps path needs a few
    temporaries the size of a layer's input or output. It keeps the largest few (at most
    six) for the next call, because writing to freshly allocated large buffers costs a page
    fault every 4 KiB. They are freed by this, or taken up again by the next call.

    Example:
        >>> from torch import nn
        >>> from maskparam.apply import apply_mask
        >>> from maskparam.masks import cross
        >>> conv = apply_mask(nn.Conv3d(16, 16, 3, padding=1), cross(3, ndim=3), execution="taps")
        >>> conv(torch.randn(1, 16, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])
        >>> empty_cache()
    """
    SCRATCH.clear()
