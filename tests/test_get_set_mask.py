"""get_mask, set_mask and is_masked, on convolutions and on any module's parameters."""

from __future__ import annotations

import torch
from torch import nn

from maskparam import apply_mask, get_mask, is_masked, remove_mask, set_mask
from tests.helpers import PLUS


def test_get_mask_returns_a_copy_in_given_shape() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    mask = get_mask(conv)
    assert torch.equal(mask, PLUS)
    mask.fill_(True)
    assert torch.equal(get_mask(conv), PLUS)


def test_set_mask_switches_taps_back_on_with_their_old_values() -> None:
    conv = nn.Conv2d(1, 1, 3, bias=False)
    original = conv.weight.detach().clone()
    apply_mask(conv, PLUS)
    set_mask(conv, torch.ones(3, 3))
    assert torch.equal(conv.weight, original)
    set_mask(conv, torch.ones(1, 1, 3, 3) * ~PLUS)  # a different shape is fine
    assert (conv.weight[:, :, PLUS] == 0).all()


def test_is_masked_on_other_names_and_modules() -> None:
    lin = apply_mask(nn.Linear(3, 3), torch.eye(3))
    assert is_masked(lin)
    assert not is_masked(lin, "bias")
    assert not is_masked(nn.ReLU())


def test_other_modules_and_parameter_names() -> None:
    emb = apply_mask(nn.Embedding(4, 3), torch.tensor([[1], [0], [1], [1]]))
    assert (emb(torch.tensor([1])) == 0).all()
    lstm = apply_mask(nn.LSTM(3, 2), torch.rand(8, 2) > 0.5, name="weight_hh_l0")
    out, _ = lstm(torch.randn(4, 1, 3))
    out.sum().backward()
    grad = lstm.parametrizations.weight_hh_l0.original.grad
    assert grad is not None
    assert (grad[~get_mask(lstm, "weight_hh_l0")] == 0).all()


def test_two_masked_tensors_on_one_module() -> None:
    lin = nn.Bilinear(2, 2, 2)
    apply_mask(lin, torch.rand(2, 2, 2) > 0.5)
    apply_mask(lin, torch.tensor([1, 0]), name="bias")
    assert lin.bias[1] == 0
    remove_mask(lin)
    assert is_masked(lin, "bias")
    remove_mask(lin, name="bias")
    assert type(lin) is nn.Bilinear
