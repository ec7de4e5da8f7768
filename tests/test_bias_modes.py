"""bias_mode keep, zero and channel: what each does to the bias, its gradient and the output."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import BiasMask, apply_mask, remove_mask, set_mask
from tests.helpers import PLUS


def test_bias_mode_keep_leaves_bias_alone() -> None:
    conv = nn.Conv2d(2, 3, 3)
    bias = conv.bias
    apply_mask(conv, PLUS)
    assert conv.bias is bias
    assert not parametrize.is_parametrized(conv, "bias")


def test_bias_mode_zero_holds_bias_at_zero_with_zero_gradient() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="zero")
    assert (conv.bias == 0).all()
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    grad = conv.parametrizations.bias.original.grad
    assert grad is not None
    assert (grad == 0).all()
    assert isinstance(conv.parametrizations.bias[0], BiasMask)


def test_bias_mode_zero_on_layer_without_bias_is_a_no_op() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, bias=False), PLUS, bias_mode="zero")
    assert conv.bias is None
    remove_mask(conv)
    assert type(conv) is nn.Conv2d


def test_bias_mode_channel_conv_transpose_groups() -> None:
    # ConvTranspose weight is (in, out // groups, k): output channel g * 2 + j reads group g.
    conv = nn.ConvTranspose1d(4, 4, 3, groups=2)
    mask = torch.ones(4, 2, 3, dtype=torch.bool)
    mask[2:, 1] = False  # group 1, local output 1 -> global output channel 3
    apply_mask(conv, mask, bias_mode="channel")
    assert conv.parametrizations.bias[0].mask.tolist() == [True, True, True, False]
    out = conv(torch.randn(2, 4, 5))
    assert (out[:, 3] == 0).all()
    assert (out[:, :3] != 0).any()


def test_bias_mode_channel_linear() -> None:
    mask = torch.tensor([[1, 0], [0, 0], [0, 1]])
    lin = apply_mask(nn.Linear(2, 3), mask, bias_mode="channel")
    assert (lin(torch.randn(4, 2))[:, 1] == 0).all()


def test_set_mask_updates_channel_bias() -> None:
    conv = apply_mask(nn.Conv2d(1, 2, 3), torch.ones(2, 1, 1, 1), bias_mode="channel")
    assert (conv.bias != 0).all()
    set_mask(conv, torch.tensor([1, 0]).reshape(2, 1, 1, 1))
    assert conv.bias[1] == 0
    assert conv.bias[0] != 0
    assert (conv(torch.randn(1, 1, 4, 4))[:, 1] == 0).all()
