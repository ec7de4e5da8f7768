"""remove_masks: bakes or restores every mask, or removes none."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.nn.utils import parametrize

from maskparam.apply import BIAS_MODES, apply_mask
from maskparam.model import apply_masks, mask_summary, remove_masks
from tests.model_helpers import (
    PLUS,
    THREE_BY_THREE,
    Block,
    Net,
    assert_unchanged,
    masked_names,
    snapshot,
)
from tests.strategies import MaskPlan, mask_plans


@pytest.fixture
def net() -> Net:
    return Net()


# -- remove_masks ------------------------------------------------------------------------------


def test_remove_masks_bakes_and_restores_plain_classes(net: Net) -> None:
    apply_masks(net, dict.fromkeys(THREE_BY_THREE, PLUS), bias_mode="channel")
    x = torch.randn(2, 1, 5, 5)
    expected = net(x)
    weights = {name: net.get_submodule(name).weight.detach().clone() for name in THREE_BY_THREE}
    assert remove_masks(net) == THREE_BY_THREE
    assert all(
        type(m) in (Net, Block, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.Linear)
        for m in net.modules()
    )
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    for name, weight in weights.items():
        assert torch.equal(net.get_submodule(name).weight, weight)
    assert torch.equal(net(x), expected)
    assert remove_masks(net) == []


def test_remove_masks_bake_false_restores_everything_bitwise(net: Net) -> None:
    before = snapshot(net)
    apply_masks(net, PLUS, include=["stem", "*.conv"], bias_mode="zero")
    assert remove_masks(net, bake=False) == THREE_BY_THREE
    assert_unchanged(net, before)


def test_remove_masks_removes_masks_on_other_tensors() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    apply_mask(model[0], torch.tensor([1, 0]), name="bias")
    apply_mask(model[1], torch.eye(2))
    apply_mask(model[1], torch.tensor([0, 1]), name="bias")
    assert remove_masks(model) == ["0", "1"]
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert model[0].bias[1].item() == 0.0
    assert model[1].weight[0, 1].item() == 0.0


@given(plan=mask_plans())
def test_remove_masks_property(plan: MaskPlan) -> None:
    before = snapshot(plan.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = apply_masks(plan.model, plan.masks)
    baked = copy.deepcopy(plan.model)
    weights = {name: baked.get_submodule(name).weight.detach().clone() for name in names}
    expected = plan.model(plan.x)
    assert remove_masks(baked) == names
    assert all(torch.equal(baked.get_submodule(n).weight, w) for n, w in weights.items())
    assert torch.equal(baked(plan.x), expected)
    assert remove_masks(plan.model, bake=False) == names
    assert_unchanged(plan.model, before)


def test_exception_remove_masks_other_parametrization_removes_nothing(net: Net) -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    apply_masks(net, PLUS, include=["stem", "*.conv"])
    parametrize.register_parametrization(net.blocks[0].conv, "weight", Double())
    before = snapshot(net)
    with pytest.raises(
        ValueError,
        match=r"could not unmask 'blocks.0.conv', so it unmasked nothing.*only parametrization",
    ):
        remove_masks(net)
    assert_unchanged(net, before)
    assert masked_names(net) == THREE_BY_THREE


@pytest.mark.parametrize("bias_mode", ["valid", "partial"])
def test_exception_remove_masks_refuses_to_bake_a_data_dependent_bias(bias_mode: str) -> None:
    if bias_mode not in BIAS_MODES:
        pytest.skip(f"bias_mode={bias_mode!r} is not in this build")
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
    apply_mask(model[0], PLUS)
    apply_mask(model[1], PLUS, bias_mode=bias_mode)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"could not unmask '1', so it unmasked nothing"):
        remove_masks(model)
    assert masked_names(model) == ["0", "1"]
    assert remove_masks(model, bake=False) == ["0", "1"]


def test_only_fixed_masks_count_as_masks() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    conv = nn.Conv2d(1, 1, 3)
    parametrize.register_parametrization(conv, "weight", Double())
    assert mask_summary(conv).rows == ()
    assert remove_masks(conv) == []
    assert parametrize.is_parametrized(conv, "weight")
