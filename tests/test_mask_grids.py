"""box, dilated and random: a dilated mask computes what dilation does; random counts exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam.apply import apply_mask
from maskparam.masks import ball, box, dilated, random
from tests.strategies import CONV

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# -- dilated ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "dilation", "padding", "stride"),
    [
        ((3,), 2, 0, 1),
        ((2, 3), (2, 3), 1, 1),
        ((3, 3), 1, 1, 2),
        ((4, 3), 3, 2, (1, 2)),
        ((3, 2, 2), (1, 2, 3), 1, 1),
    ],
)
def test_dilated_conv_equals_dilation_exactly(
    kernel: tuple[int, ...],
    dilation: int | tuple[int, ...],
    padding: int,
    stride: int | tuple[int, ...],
) -> None:
    ndim = len(kernel)
    mask = dilated(kernel, dilation)
    d = (dilation,) * ndim if isinstance(dilation, int) else dilation
    assert mask.shape == tuple((k - 1) * s + 1 for k, s in zip(kernel, d, strict=True))
    assert int(mask.sum()) == math.prod(kernel)
    # Small integers: every sum is exact, so any order of summation gives the same bits.
    w = torch.randint(-3, 4, (2, 3, *kernel)).double()
    x = torch.randint(-3, 4, (2, 3, *(9,) * ndim)).double()
    layer = CONV[ndim](3, 2, tuple(mask.shape), stride=stride, padding=padding, bias=False)
    conv = apply_mask(layer, mask)
    conv = conv.double()
    spread = torch.zeros(2, 3, *mask.shape, dtype=torch.float64)
    spread[:, :, mask] = w.flatten(2)  # the kept taps, in raster order, are the kernel's taps
    conv.weight = spread
    expected = CONV_FN[ndim](x, w, stride=stride, padding=padding, dilation=dilation)
    assert torch.equal(conv(x), expected)


def test_dilated_with_dilation_one_is_a_box() -> None:
    assert torch.equal(dilated(3, 1, ndim=2), box(3, ndim=2))


# -- random -----------------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_random_hits_the_exact_count(shape: tuple[int, ...], density: float, seed: int) -> None:
    mask = random(shape, density, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == shape
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == round(density * math.prod(shape))


def test_random_rounds_halves_to_even() -> None:
    assert int(random(10, 0.25).sum()) == 2  # round(2.5) == 2
    assert int(random(10, 0.35).sum()) == round(3.5) == 4
    assert int(random((3, 3), 0.0).sum()) == 0
    assert bool(random((3, 3), 1.0).all())


def test_random_is_reproducible() -> None:
    def draw(seed: int) -> torch.Tensor:
        return random((8, 8), 0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    torch.manual_seed(7)
    first = random((8, 8), 0.5)
    torch.manual_seed(7)
    assert torch.equal(random((8, 8), 0.5), first)  # the global generator, when none is given


@pytest.mark.cuda
def test_random_with_a_cuda_generator() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    mask = random((5, 7), 0.4, generator=generator)
    assert mask.device.type == "cpu"
    assert int(mask.sum()) == 14
    again = random((5, 7), 0.4, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(mask, again)
    conv = apply_mask(nn.Conv2d(2, 3, 5, device="cuda"), ball(5, ndim=2))
    assert int((conv.weight[0, 0] != 0).sum().item()) == 13
