"""Masked taps are exactly zero on every access, get exactly zero gradient, and keep inf and
NaN out; outputs match the functional convolution with the masked weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import apply_mask, get_mask, is_masked
from tests.helpers import OPTIMIZERS, PLUS, STACKED_PLUS, full_mask, functional
from tests.strategies import ConvCase, conv_cases, masks_for

# -- zero at masked taps on every access ---------------------------------------------------


def test_smoke() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    assert is_masked(conv)
    assert isinstance(conv, nn.Conv2d)
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert (conv.weight[:, :, PLUS] != 0).all()
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 3, 3, 3)


def test_zero_right_after_apply_before_any_forward() -> None:
    conv = nn.Conv3d(1, 4, 3)
    with torch.no_grad():
        conv.weight.fill_(7.0)
    apply_mask(conv, STACKED_PLUS)
    assert (conv.weight[:, :, ~STACKED_PLUS] == 0).all()
    assert (conv.weight[:, :, STACKED_PLUS] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_zero_after_to_dtype(dtype: torch.dtype) -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3), PLUS).to(dtype)
    assert conv.weight.dtype == dtype
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert get_mask(conv).dtype == torch.bool
    out = conv(torch.randn(1, 2, 5, 5, dtype=dtype))
    assert out.dtype == dtype


def test_zero_after_load_state_dict() -> None:
    source = apply_mask(nn.Conv2d(2, 2, 3), PLUS)
    with torch.no_grad():
        source.parametrizations.weight.original.fill_(3.0)  # masked taps too
    target = apply_mask(nn.Conv2d(2, 2, 3), PLUS)
    target.load_state_dict(source.state_dict(), strict=True)
    assert (target.weight[:, :, ~PLUS] == 0).all()
    assert (target.weight[:, :, PLUS] == 3.0).all()


def test_device_follows_weight(device: torch.device) -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3).to(device), PLUS)
    assert get_mask(conv).device.type == device.type
    moved = apply_mask(nn.Conv2d(1, 1, 3), PLUS).to(device)
    assert moved.parametrizations.weight[0].mask.device.type == device.type
    assert moved(torch.randn(1, 1, 4, 4, device=device)).device.type == device.type


# -- exact zero gradients, and the functional conv's outputs, for every layer option -------


@given(case=conv_cases(dtype=torch.float64), data=st.data())
def test_masked_gradient_is_exactly_zero_and_output_matches_functional(
    case: ConvCase, data: st.DataObject
) -> None:
    layer, x = case.layer, case.x
    ndim = x.dim() - 2
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=ndim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-zero masks are allowed
        apply_mask(layer, mask)
    original = layer.parametrizations.weight.original
    full = full_mask(layer, mask)

    out = layer(x)
    expected = functional(layer, x, torch.where(full, original.detach(), 0))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    out.mul(torch.randn_like(out)).sum().backward()
    assert original.grad is not None
    assert (original.grad[~full] == 0).all()


@given(case=conv_cases(dtype=torch.float32, ndims=(1, 2)), data=st.data())
def test_masked_gradient_is_exactly_zero_float32(case: ConvCase, data: st.DataObject) -> None:
    layer, x = case.layer, case.x
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=x.dim() - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        apply_mask(layer, mask)
    layer(x).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None
    assert (grad[~full_mask(layer, mask)] == 0).all()


def test_linear_matches_functional() -> None:
    lin = nn.Linear(5, 3)
    mask = torch.rand(3, 5) > 0.5
    apply_mask(lin, mask)
    x = torch.randn(4, 5)
    w = torch.where(mask, lin.parametrizations.weight.original.detach(), 0)
    assert torch.equal(lin(x), F.linear(x, w, lin.bias))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding: str) -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3, padding=padding), PLUS)
    x = torch.randn(1, 2, 6, 6)
    w = torch.where(PLUS, conv.parametrizations.weight.original.detach(), 0)
    assert torch.equal(conv(x), F.conv2d(x, w, conv.bias, padding=padding))


def test_gradcheck_end_to_end_through_layer() -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3, padding=1, stride=2).double(), PLUS)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))
    assert torch.autograd.gradgradcheck(conv, (x,))


# -- real training -------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_stays_masked_after_training(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer], bias_mode: str
) -> None:
    mask = STACKED_PLUS.clone()
    per_channel = mask.expand(4, 2, 3, 3, 3).clone()
    per_channel[1] = False  # one fully masked filter
    conv = apply_mask(nn.Conv3d(2, 4, 3, padding=1), per_channel, bias_mode=bias_mode)  # type: ignore[arg-type]
    opt = make_opt(list(conv.parameters()))
    x, y = torch.randn(2, 2, 5, 5, 5), torch.randn(2, 4, 5, 5, 5)
    for _ in range(15):
        opt.zero_grad()
        F.mse_loss(conv(x), y).backward()
        opt.step()
        assert (conv.weight[~per_channel] == 0).all()
    assert (conv.weight[per_channel] != 0).all()
    if bias_mode == "zero":
        assert (conv.bias == 0).all()
    if bias_mode == "channel":
        assert conv.bias[1] == 0
        assert (conv(x)[:, 1] == 0).all()
        assert (conv.bias[[0, 2, 3]] != 0).all()


def test_output_and_gradients_ignore_original_at_masked_taps() -> None:
    torch.manual_seed(1)
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        conv.zero_grad()
        x.grad = None
        out = conv(x)
        out.square().sum().backward()
        assert x.grad is not None
        grad_w = conv.parametrizations.weight.original.grad
        assert grad_w is not None
        return out.detach(), x.grad.clone(), grad_w.clone()

    first = run()
    with torch.no_grad():
        conv.parametrizations.weight.original[:, :, ~PLUS] = torch.randn(3, 2, 4) * 100
    second = run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# -- inf and NaN at masked taps ------------------------------------------------------------


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_inf_nan_at_masked_taps_stay_out(special: float) -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    with torch.no_grad():
        conv.parametrizations.weight.original[:, :, ~PLUS] = special
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = conv(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    grad_w = conv.parametrizations.weight.original.grad
    assert grad_w is not None
    assert torch.isfinite(grad_w).all()


# -- active taps counted at the border -----------------------------------------------------


def test_motivating_scenario_counts_active_taps_inside_input() -> None:
    conv = nn.Conv3d(1, 8, 3, padding=1, bias=False)
    apply_mask(conv, STACKED_PLUS)
    with torch.no_grad():
        conv.parametrizations.weight.original.fill_(1.0)
    out = conv(torch.ones(1, 1, 6, 6, 6))

    expected = torch.zeros(6, 6, 6)
    for z in range(6):
        for y in range(6):
            for x in range(6):
                count = 0
                for dz in range(3):
                    for dy in range(3):
                        for dx in range(3):
                            inside = all(
                                0 <= c + d - 1 < 6 for c, d in ((z, dz), (y, dy), (x, dx))
                            )
                            count += int(bool(STACKED_PLUS[dz, dy, dx]) and inside)
                expected[z, y, x] = count
    assert expected[2, 2, 2] == 15
    assert expected[0, 0, 0] == 6
    for channel in range(8):
        assert torch.equal(out[0, channel], expected)
