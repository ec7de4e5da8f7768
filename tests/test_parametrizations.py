"""FixedMask and BiasMask on their own: a bool mask buffer, torch.where, exact gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from maskparam import BiasMask, FixedMask


def test_smoke() -> None:
    fm = FixedMask(torch.tensor([[True, False], [False, True]]))
    out = fm(torch.full((2, 2), 5.0))
    assert torch.equal(out, torch.tensor([[5.0, 0.0], [0.0, 5.0]]))


def test_mask_buffer_is_bool_named_mask_and_saved() -> None:
    fm = FixedMask(torch.tensor([1, 0, 1]))
    assert fm.mask.dtype == torch.bool
    assert dict(fm.named_buffers()) == {"mask": fm.mask}
    # The values under the mask stay in the original: the mask saves only itself.
    assert set(fm.state_dict()) == {"mask"}


@pytest.mark.parametrize("convert", ["half", "double", "bfloat16", "float"])
def test_mask_stays_bool_after_dtype_conversion(convert: str) -> None:
    conv = nn.Conv2d(1, 1, 3)
    parametrize.register_parametrization(conv, "weight", FixedMask(torch.eye(3)))
    getattr(conv, convert)()
    assert conv.parametrizations.weight[0].mask.dtype == torch.bool
    assert conv.weight.dtype == conv.parametrizations.weight.original.dtype


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_where_not_multiply_special_values_never_leak(special: float) -> None:
    mask = torch.tensor([True, False, True])
    x = torch.tensor([1.0, special, 2.0], requires_grad=True)
    out = FixedMask(mask)(x)
    assert torch.equal(out, torch.tensor([1.0, 0.0, 2.0]))
    (out * torch.tensor([3.0, 4.0, 5.0])).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.tensor([3.0, 0.0, 5.0]))


@given(bits=st.lists(st.booleans(), min_size=6, max_size=6))
def test_gradient_is_exactly_zero_at_masked_entries(bits: list[bool]) -> None:
    mask = torch.tensor(bits).reshape(2, 3)
    x = torch.randn(2, 3, requires_grad=True)
    FixedMask(mask)(x).mul(torch.randn(2, 3)).sum().backward()
    assert x.grad is not None
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("shape", [(3, 3), (2, 1, 3, 3), (2, 2, 3, 3)])
def test_gradcheck(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape) > 0.4
    fm = FixedMask(mask)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fm, (x,))
    assert torch.autograd.gradgradcheck(fm, (x,))


def test_gradcheck_through_a_conv() -> None:
    fm = FixedMask(torch.rand(3, 3) > 0.5)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(inp, fm(weight), stride=2, padding=1)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def test_right_inverse_stores_assigned_values_unmasked() -> None:
    conv = nn.Conv1d(1, 1, 3, bias=False)
    parametrize.register_parametrization(conv, "weight", FixedMask(torch.tensor([1, 0, 1])))
    conv.weight = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert torch.equal(conv.weight, torch.tensor([[[1.0, 0.0, 3.0]]]))
    assert torch.equal(conv.parametrizations.weight.original, torch.tensor([[[1.0, 2.0, 3.0]]]))


def test_registering_keeps_original_values_bitwise() -> None:
    conv = nn.Conv2d(2, 3, 3)
    before = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", FixedMask(torch.eye(3)))
    assert torch.equal(conv.parametrizations.weight.original, before)


def test_accepts_lists_and_float_zero_one() -> None:
    assert FixedMask([[1, 0], [0, 1]]).mask.dtype == torch.bool
    assert torch.equal(FixedMask(torch.tensor([0.0, 1.0])).mask, torch.tensor([False, True]))


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.tensor([0.0, 0.5, 1.0]), ValueError, "all 0 or 1"),
        (torch.tensor([0.0, float("nan")]), ValueError, "NaN"),
        (torch.tensor([2, 1]), ValueError, "all 0 or 1"),
        (torch.tensor([1j, 0j]), TypeError, "real-valued"),
        ("abc", TypeError, "torch.as_tensor"),
    ],
)
def test_exception(mask: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        FixedMask(mask)


def test_bias_mask_modes() -> None:
    bm = BiasMask(torch.tensor([True, False]), mode="channel")
    assert torch.equal(bm(torch.tensor([3.0, 4.0])), torch.tensor([3.0, 0.0]))
    assert isinstance(bm, FixedMask)
    with pytest.raises(ValueError, match="mode 'zero' or 'channel'"):
        BiasMask(torch.tensor([True]), mode="sometimes")  # type: ignore[arg-type]


def test_extra_repr_counts_active_taps() -> None:
    assert "active=5/9" in repr(FixedMask(torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])))
