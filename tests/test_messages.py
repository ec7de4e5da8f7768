"""Messages name the layer's own class (``Conv3d``), never parametrize's ``ParametrizedConv3d``.

Once one tensor of a layer is parametrized, ``type(module)`` is a class that parametrize
generated; a message that prints it names a class the user never wrote.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskparam import apply_mask, apply_masks, masks

CROSS3 = masks.cross(3, ndim=3)


def _bias_masked() -> nn.Conv3d:
    """A Conv3d whose bias, not its weight, is masked: parametrized, weight still plain."""
    return apply_mask(nn.Conv3d(1, 2, 3), torch.tensor([1, 0]), name="bias")


def test_apply_masks_names_a_masked_layer_by_its_own_class() -> None:
    model = nn.Sequential(apply_mask(nn.Conv3d(1, 1, 3), CROSS3))
    with pytest.raises(ValueError, match=r"could not mask '0' \(Conv3d\)"):
        apply_masks(model, CROSS3, include=nn.Conv3d)


def test_apply_masks_misfit_hint_names_the_own_class() -> None:
    model = nn.Sequential(_bias_masked(), nn.Conv3d(1, 1, 2))
    with pytest.raises(ValueError, match=r"'1' \(Conv3d\)") as info:
        apply_masks(model, CROSS3, include=nn.Conv3d)
    assert "isinstance(m, nn.Conv3d)" in str(info.value)


def test_apply_mask_already_masked_names_the_own_class() -> None:
    conv = apply_mask(nn.Conv3d(1, 1, 3), CROSS3)
    with pytest.raises(ValueError, match=r"^Conv3d\.weight is already masked"):
        apply_mask(conv, CROSS3)


def test_apply_mask_misfit_names_the_own_class() -> None:
    with pytest.raises(ValueError, match=r"for Conv3d\.weight\.shape="):
        apply_mask(_bias_masked(), torch.ones(2, 2, 2))


def test_apply_mask_bias_mode_on_a_masked_bias_names_the_own_class() -> None:
    with pytest.raises(ValueError, match=r"needs Conv3d\.bias to be a plain parameter"):
        apply_mask(_bias_masked(), CROSS3, bias_mode="channel")


def test_apply_mask_all_zero_warning_names_the_own_class() -> None:
    with pytest.warns(UserWarning, match=r"^The mask for Conv3d\.weight is all zero"):
        apply_mask(_bias_masked(), torch.zeros(3, 3, 3))


def test_taps_fallback_names_the_own_class() -> None:
    conv = apply_mask(nn.ConvTranspose3d(1, 2, 3), torch.tensor([1, 0]), name="bias")
    with pytest.warns(UserWarning, match=r"not ConvTranspose3d\.$"):
        apply_mask(conv, CROSS3, execution="taps")
