"""Partial convolution's errors: the rule, and what it got."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskparam.apply import apply_mask, is_masked
from maskparam.partial import PartialSequential, coverage, partial_conv
from tests.partial_helpers import MODES, PLUS, masked

# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exception_apply_mask_needs_a_conv(mode: str) -> None:
    for layer in (nn.ConvTranspose2d(2, 3, 3), nn.Linear(3, 3)):
        mask = PLUS if isinstance(layer, nn.ConvTranspose2d) else torch.eye(3)
        with pytest.raises(ValueError, match="Conv1d, Conv2d and Conv3d"):
            masked(layer, mask, mode)
        assert not is_masked(layer)
        assert type(layer) in (nn.ConvTranspose2d, nn.Linear)
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="masking a layer's weight"):
        apply_mask(conv, torch.ones(3), name="bias", bias_mode=mode)  # type: ignore[arg-type]
    assert not is_masked(conv, "bias")


def test_exception_partial_conv_needs_the_bias_mode() -> None:
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="not masked"):
        partial_conv(nn.Conv2d(2, 3, 3), x)
    with pytest.raises(ValueError, match="another bias_mode"):
        partial_conv(apply_mask(nn.Conv2d(2, 3, 3), PLUS), x)
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        partial_conv("conv", x)  # type: ignore[arg-type]


def test_exception_partial_conv_input_and_validity() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match="expects input of shape"):
        partial_conv(conv, torch.randn(5, 5))
    with pytest.raises(TypeError, match="bool tensor"):
        partial_conv(conv, x, torch.ones(2, 1, 5, 5))
    with pytest.raises(TypeError, match="bool tensor"):
        partial_conv(conv, x, [[True]])  # type: ignore[arg-type]
    bad_shapes = [(2, 3, 5, 5), (2, 1, 5, 4), (3, 1, 5, 5), (1, 5, 5), (2, 1, 1, 5, 5)]
    for shape in bad_shapes:
        with pytest.raises(ValueError, match=r"validity of shape \(N or 1, 1 or C_in=2"):
            partial_conv(conv, x, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="device of the input"):
        partial_conv(conv, x, torch.ones(2, 1, 5, 5, dtype=torch.bool, device="meta"))


def test_exception_coverage() -> None:
    validity = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="Conv1d, Conv2d or Conv3d"):
        coverage(nn.ConvTranspose2d(1, 1, 3), validity)
    with pytest.raises(ValueError, match="validity of shape"):
        coverage(nn.Conv2d(2, 1, 3), torch.ones(1, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        coverage(nn.Conv2d(1, 1, 3), validity.float())
    with pytest.raises(ValueError, match="device of the weight"):
        coverage(nn.Conv2d(1, 1, 3), validity.to("meta"))


def test_exception_partial_sequential() -> None:
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="at least one conv masked"):
        PartialSequential(nn.Conv2d(1, 1, 3), nn.ReLU())(x)
    pooled = PartialSequential(
        masked(nn.Conv2d(1, 1, 3, padding=1), PLUS, "partial"), nn.MaxPool2d(2)
    )
    with pytest.raises(ValueError, match=r"Layer 1 \(MaxPool2d\) turned"):
        pooled(x)
