"""The causal mask: raster order, and a stack of layers that never sees the present."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import pytest
import torch
from hypothesis import given
from torch import nn

from maskparam.apply import apply_mask, get_mask
from maskparam.masks import causal
from tests.mask_rules import by_rule
from tests.strategies import CONV, odd_kernel_sizes


@given(sizes=odd_kernel_sizes(ndims=(1, 2, 3, 4)))
def test_causal_is_lexicographic_order(sizes: tuple[int, ...]) -> None:
    centre = (0,) * len(sizes)
    a, b = causal(sizes, kind="A"), causal(sizes, kind="B")
    assert torch.equal(a, by_rule(sizes, lambda o: o < centre))
    assert torch.equal(b, by_rule(sizes, lambda o: o <= centre))
    assert int(a.sum()) == math.prod(sizes) // 2
    assert int((b & ~a).sum()) == 1


def _stack(ndim: int, masks: list[torch.Tensor], channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for mask, c_in, c_out in zip(masks, channels, channels[1:], strict=False):
        conv = CONV[ndim](c_in, c_out, 3, padding=1, dtype=torch.float64)
        layers += [apply_mask(conv, mask), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _grad_at(
    net: nn.Module, x: torch.Tensor, channels: slice, where: tuple[int, ...]
) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = net(x)
    (grad,) = torch.autograd.grad(y[(0, channels, *where)].sum(), x)
    return grad[0]


@pytest.mark.parametrize(("ndim", "side"), [(1, 9), (2, 5), (3, 4)])
def test_causal_stack_never_sees_the_present_or_the_future(ndim: int, side: int) -> None:
    masks = [causal(3, ndim=ndim, kind="A")] + [causal(3, ndim=ndim, kind="B")] * 2
    net = _stack(ndim, masks, [2, 4, 4, 2])
    x = torch.randn(1, 2, *(side,) * ndim, dtype=torch.float64)
    for flat, where in enumerate(itertools.product(range(side), repeat=ndim)):
        seen = _grad_at(net, x, slice(None), where).abs().sum(0).flatten()
        assert bool((seen[flat:] == 0).all()), where  # that position and every later one
        if where[-1] > 0:
            assert seen[flat - 1] != 0, where  # the previous tap in its row is seen


@pytest.mark.parametrize("interleaved", [False, True], ids=["contiguous", "interleaved"])
def test_causal_channel_groups_through_a_stack(interleaved: bool) -> None:
    def mask(kind: Literal["A", "B"], c_in: int, c_out: int) -> torch.Tensor:
        return causal(
            3, ndim=2, kind=kind, in_channels=c_in, out_channels=c_out, interleaved=interleaved
        )

    net = _stack(2, [mask("A", 3, 6), mask("B", 6, 6), mask("B", 6, 3)], [3, 6, 6, 3])
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    for where in [(0, 0), (2, 2), (4, 3)]:
        flat = where[0] * 5 + where[1]
        for g in range(3):  # output channel g is colour group g
            grad = _grad_at(net, x, slice(g, g + 1), where)
            later = grad.flatten(1)[:, flat + 1 :]
            assert bool((later == 0).all())
            here = grad[(slice(None), *where)]
            assert bool((here[g:] == 0).all()), (where, g)  # not its own group, nor later
            assert bool((here[:g] != 0).all()), (where, g)  # but the earlier groups


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["contiguous", "interleaved"])
def test_causal_channel_group_layout(kind: Literal["A", "B"], interleaved: bool) -> None:
    full = causal((3, 3), kind=kind, in_channels=6, out_channels=3, interleaved=interleaved)
    assert full.shape == (3, 6, 3, 3)
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    spatial = causal((3, 3), kind="A")[off_centre]  # every pair: the type-A taps off the centre
    assert torch.equal(full[:, :, off_centre], spatial.expand(3, 6, -1))
    group_in = [c % 3 for c in range(6)] if interleaved else [c // 2 for c in range(6)]
    for o, i in itertools.product(range(3), range(6)):
        sees = group_in[i] < o or (kind == "B" and group_in[i] == o)
        assert bool(full[o, i, 1, 1]) == sees, (o, i)


def test_causal_channel_groups_option() -> None:
    full = causal(1, ndim=1, kind="B", in_channels=4, out_channels=4, channel_groups=2)
    assert full[:, :, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    one = causal(3, ndim=2, kind="B", in_channels=2, out_channels=2, channel_groups=1)
    assert torch.equal(one, causal(3, ndim=2, kind="B").expand(2, 2, 3, 3))


def test_causal_channel_form_fits_apply_mask() -> None:
    mask = causal(5, ndim=2, in_channels=3, out_channels=6)
    conv = apply_mask(nn.Conv2d(3, 6, 5), mask)
    assert torch.equal(get_mask(conv), mask)
