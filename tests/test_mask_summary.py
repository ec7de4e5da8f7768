"""mask_summary: active taps and parameters per masked layer, and the totals."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import model as model_module
from maskparam import summary
from maskparam.apply import apply_mask
from maskparam.model import apply_masks
from maskparam.summary import LayerSummary, MaskSummary, mask_summary
from tests.model_helpers import PLUS
from tests.strategies import ConvCase, conv_cases, masks_for

# -- mask_summary ------------------------------------------------------------------------------


def test_mask_summary_rows_and_total() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),  # spatial mask, bias kept: 5/9 taps
        nn.Conv2d(3, 4, 3, bias=False),  # per-output-channel mask
        nn.ConvTranspose1d(2, 4, 3, groups=2),  # per-element mask
        nn.Linear(4, 2),  # no kernel
        nn.Conv2d(1, 1, 1),  # unmasked: no row
    )
    per_channel = torch.tensor([1, 0, 1, 0], dtype=torch.bool).reshape(4, 1, 1, 1)
    element = torch.zeros(2, 2, 3, dtype=torch.bool)
    element[0, 1, 0] = element[1, 0, 2] = True  # taps 0 and 2 used by some filter
    apply_masks(model, {"0": PLUS, "1": per_channel, "2": element})
    apply_mask(model[3], torch.tensor([1, 0]), name="bias")
    summary = mask_summary(model)
    assert summary.rows == (
        LayerSummary("0", "Conv2d", (3, 3), 5, 9, 3 * 2 * 5 + 3, 3 * 2 * 9 + 3),
        LayerSummary("1", "Conv2d", (3, 3), 9, 9, 2 * 3 * 9, 4 * 3 * 9),
        LayerSummary("2", "ConvTranspose1d", (3,), 2, 3, 2 + 4, 12 + 4),
        LayerSummary("3", "Linear", None, None, None, 8 + 1, 8 + 2),
    )
    assert summary.total == LayerSummary(
        "total", "", None, 16, 21, 33 + 54 + 6 + 9, 57 + 108 + 16 + 10
    )
    text = str(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "kernel", "active", "taps", "active", "params"]
    assert lines[1].split() == ["0", "Conv2d", "3x3", "5/9", "33/57", "(57.9%)"]
    assert lines[3].split() == ["2", "ConvTranspose1d", "3", "2/3", "6/16", "(37.5%)"]
    assert lines[4].split() == ["3", "Linear", "-", "-", "9/10", "(90.0%)"]
    assert lines[5].split() == ["total", "16/21", "102/191", "(53.4%)"]
    # The whole model adds the unmasked 1x1 conv: 1 tap, 1 weight and 1 bias.
    assert summary.model_total == LayerSummary("whole model", "", None, 17, 22, 104, 193)
    assert lines[6].split() == ["whole", "model", "17/22", "104/193", "(53.9%)"]
    assert len(lines) == 7
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned columns


def test_mask_summary_bias_modes_count_the_bias() -> None:
    channel = torch.zeros(2, 1, 1, dtype=torch.bool)
    channel[0] = True
    zero = apply_masks(
        nn.Sequential(nn.Conv1d(1, 2, 3)), torch.ones(3), include=nn.Conv1d, bias_mode="zero"
    )
    assert zero == ["0"]
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Conv1d(1, 2, 3))
    apply_masks(model, {"0": torch.ones(3)}, bias_mode="zero")
    apply_masks(model, {"1": channel}, bias_mode="channel")
    rows = mask_summary(model).rows
    assert (rows[0].active_params, rows[0].total_params) == (6, 8)
    assert (rows[1].active_params, rows[1].total_params) == (3 + 1, 8)


def test_mask_summary_of_an_unmasked_model_is_empty() -> None:
    summary = mask_summary(nn.Sequential(nn.Conv2d(1, 1, 3)))
    whole = LayerSummary("whole model", "", None, 9, 9, 10, 10)
    assert summary == MaskSummary(rows=(), model_total=whole)
    assert summary.total == LayerSummary("total", "", None, None, None, 0, 0)
    assert str(summary).splitlines()[1].split() == ["total", "-", "0/0"]
    assert str(summary).splitlines()[2].split() == ["whole", "model", "9/9", "10/10", "(100.0%)"]


def test_mask_summary_whole_model_counts_every_parameter_once() -> None:
    shared = nn.Conv1d(1, 1, 3)
    free = nn.Parameter(torch.ones(5))  # a parameter of a container, in no layer
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(2, 2))
    model.register_parameter("scale", free)
    apply_masks(model, {"0": torch.tensor([1, 0, 1])})
    summary = mask_summary(model)
    assert [row.name for row in summary.rows] == ["0"]  # the shared conv, once
    expected = sum(p.numel() for p in model.parameters())
    assert expected == 4 + 6 + 5
    assert summary.model_total.total_params == expected
    assert summary.model_total.active_params == expected - 1
    assert (summary.model_total.active_taps, summary.model_total.total_taps) == (2, 3)


def test_mask_summary_whole_model_without_convs_has_no_taps() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    apply_masks(model, torch.tensor([1, 0]), include=nn.Linear)
    whole = mask_summary(model).model_total
    assert (whole.active_taps, whole.total_taps) == (None, None)
    assert (whole.active_params, whole.total_params) == (4 + 2, 6 + 3)


def test_mask_summary_is_frozen_data() -> None:
    summary = mask_summary(apply_mask(nn.Conv2d(1, 1, 3), PLUS))
    with pytest.raises(AttributeError):
        summary.rows = ()  # type: ignore[misc]
    assert summary.rows[0].name == ""


@given(case=conv_cases(dtype=torch.float32), data=st.data())
def test_mask_summary_counts_match_the_weights(case: ConvCase, data: st.DataObject) -> None:
    layer = case.layer
    spatial = case.x.dim() - 2
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=spatial))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_mask(layer, mask, bias_mode="channel" if layer.bias is not None else "keep")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(1.0)  # Every entry nonzero unless a mask holds it at zero.
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(0)
    row = mask_summary(nn.Sequential(layer)).rows[0]
    assert row.active_params == int((weight != 0).sum() + (bias != 0).sum())
    assert row.total_params == weight.numel() + bias.numel()
    used = [bool(weight[(..., *index)].any()) for index in _kernel_positions(layer.kernel_size)]
    assert (row.active_taps, row.total_taps) == (sum(used), len(used))
    assert row.kernel == tuple(layer.kernel_size)


def _kernel_positions(kernel: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    grids = torch.meshgrid(*(torch.arange(k) for k in kernel), indexing="ij")
    yield from zip(*(g.flatten().tolist() for g in grids), strict=True)


def test_mask_summary_is_importable_from_maskparam_model_too() -> None:
    assert model_module.mask_summary is summary.mask_summary
    assert (model_module.LayerSummary, model_module.MaskSummary) == (LayerSummary, MaskSummary)
