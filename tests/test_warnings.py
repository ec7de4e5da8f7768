"""Every warning maskparam gives from a public call points at the caller's line.

A warning that names a line inside maskparam sends the reader to the wrong file, and a
``filterwarnings`` entry keyed on the module (``module=...``) cannot select it. Each test
calls the public function on one line of this file and checks the warning's filename.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import apply_mask, apply_masks, masks, set_mask

HERE = __file__
PLUS = masks.cross(3, ndim=2)
ALL_ZERO = "is all zero: every tap is switched off"
FALLBACK = "execution='taps' falls back to the dense convolution"
# Too fragmented for boxes (more than taps.MAX_BOXES), so only the tap kernel could take it.
FRAGMENTED = masks.random((15, 15), 0.5, generator=torch.Generator().manual_seed(0))


def _only(record: pytest.WarningsRecorder) -> warnings.WarningMessage:
    assert len(record) == 1, [str(w.message) for w in record]
    return record[0]


def test_apply_mask_all_zero_points_at_the_caller() -> None:
    with pytest.warns(UserWarning, match=ALL_ZERO) as record:
        apply_mask(nn.Conv2d(1, 1, 3), torch.zeros(3, 3))
    assert _only(record).filename == HERE


def test_set_mask_all_zero_points_at_the_caller() -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    with pytest.warns(UserWarning, match=ALL_ZERO) as record:
        set_mask(conv, torch.zeros(3, 3))
    assert _only(record).filename == HERE


def test_apply_masks_all_zero_points_at_the_caller() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3))
    with pytest.warns(UserWarning, match=f"^'1': The mask for Conv2d.weight {ALL_ZERO}") as rec:
        apply_masks(model, {"0": PLUS, "1": torch.zeros(3, 3)})
    assert _only(rec).filename == HERE


def test_apply_masks_taps_fallback_points_at_the_caller() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(1, 1, 3))
    with pytest.warns(UserWarning, match=f"^'0': {FALLBACK} for this ConvTranspose2d") as rec:
        apply_masks(model, PLUS, include=nn.ConvTranspose2d, execution="taps")
    assert _only(rec).filename == HERE


def test_apply_mask_taps_fallback_for_conv_transpose_points_at_the_caller() -> None:
    with pytest.warns(UserWarning, match=f"{FALLBACK} for this ConvTranspose2d") as record:
        apply_mask(nn.ConvTranspose2d(1, 1, 3), PLUS, execution="taps")
    assert _only(record).filename == HERE


def test_apply_mask_taps_fallback_for_a_data_dependent_bias_points_at_the_caller() -> None:
    with pytest.warns(UserWarning, match=f"{FALLBACK}.*bias_mode='valid'") as record:
        apply_mask(nn.Conv2d(1, 1, 3), PLUS, bias_mode="valid", execution="taps")
    assert _only(record).filename == HERE


def test_apply_mask_taps_fallback_for_a_fragmented_mask_points_at_the_caller() -> None:
    conv = nn.Conv2d(1, 1, 15).double()  # float64: the tap kernel runs float32 only
    with pytest.warns(UserWarning, match=f"{FALLBACK}.*more than 32 boxes") as record:
        apply_mask(conv, FRAGMENTED, execution="taps")
    assert _only(record).filename == HERE


def test_set_mask_taps_fallback_for_a_fragmented_mask_points_at_the_caller() -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 15).double(), masks.cross(15, ndim=2), execution="taps")
    with pytest.warns(UserWarning, match=f"{FALLBACK}.*more than 32 boxes") as record:
        set_mask(conv, FRAGMENTED)
    assert _only(record).filename == HERE


def test_forward_taps_fallback_points_at_the_caller() -> None:
    class Double(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    conv = apply_mask(nn.Conv2d(1, 1, 3, padding=1), PLUS, execution="taps")
    parametrize.register_parametrization(conv, "weight", Double())  # after the mask
    x = torch.randn(1, 1, 5, 5)
    with pytest.warns(UserWarning, match=f"{FALLBACK}.*another parametrization") as record:
        conv(x)
    assert _only(record).filename == HERE
