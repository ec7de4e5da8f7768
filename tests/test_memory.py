"""The scratch buffers the box paths keep between calls."""

from __future__ import annotations

import torch
from torch import nn

from maskparam import taps
from maskparam.taps import memory
from maskparam.taps.memory import Scratch
from tests.tap_helpers import (
    cross3d,
    twins,
)


def test_empty_cache_frees_the_kept_buffers() -> None:
    _, tapped = twins(nn.Conv3d(16, 16, 3, padding=1), cross3d(), "taps")
    tapped(torch.randn(1, 16, 6, 6, 6)).sum().backward()  # contiguous: takes scratch buffers
    assert len(memory.SCRATCH)
    taps.empty_cache()
    assert not len(memory.SCRATCH)


def test_scratch_buffers_are_never_shared_and_kept_bounded() -> None:
    scratch = Scratch(keep=2)
    a = scratch.take((2, 3, 4, 5), torch.float32, channels_last=True)
    b = scratch.take((2, 3, 4, 5), torch.float32, channels_last=True)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert a.shape == (2, 3, 4, 5)
    assert a.data_ptr() != b.data_ptr()
    scratch.give(a, None, b)
    c = scratch.take((7, 11), torch.float32, channels_last=False)  # fits in either
    assert c.is_contiguous()
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr())
    assert scratch.take((7, 11), torch.float64, channels_last=False).data_ptr() not in (
        a.data_ptr(),
        b.data_ptr(),
    )
    big = scratch.take((1000,), torch.float32, channels_last=False)
    scratch.give(c, big)  # three buffers: the smallest goes
    kept = {scratch.take((120,), torch.float32, channels_last=False).data_ptr() for _ in "ab"}
    assert big.data_ptr() in kept
    scratch.clear()
    assert scratch.take((120,), torch.float32, channels_last=False).data_ptr() not in kept
