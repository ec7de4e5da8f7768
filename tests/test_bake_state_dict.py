"""bake_state_dict: a masked state_dict into a plain one, on its keys alone."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam.apply import apply_mask
from maskparam.checkpoint import bake_state_dict
from maskparam.model import apply_masks
from tests.checkpoint_helpers import LAYERS, PLUS, X, masked_net, plain_net, trained
from tests.strategies import MaskPlan, mask_plans

# -- bake_state_dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_bake_state_dict_loads_strict_into_the_plain_model_with_equal_outputs(
    bias_mode: str,
) -> None:
    net = trained(masked_net(bias_mode=bias_mode))
    state = net.state_dict()
    baked = bake_state_dict(state)
    plain = plain_net()
    plain.load_state_dict(baked, strict=True)
    plain.eval()
    assert torch.equal(plain(X), net(X))
    for name in LAYERS:
        masked = net.get_submodule(name)
        assert torch.equal(baked[f"{name}.weight"], masked.weight)
        assert torch.equal(baked[f"{name}.bias"], masked.bias)
    assert baked.keys() == plain.state_dict().keys()


def test_bake_state_dict_leaves_its_input_and_other_entries_alone() -> None:
    state = masked_net().state_dict()
    before = OrderedDict((k, v.clone()) for k, v in state.items())
    baked = bake_state_dict(state)
    assert list(state) == list(before)
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert baked["1.running_mean"] is state["1.running_mean"]
    assert baked["1.num_batches_tracked"] is state["1.num_batches_tracked"]


def test_bake_state_dict_keeps_metadata_without_the_parametrization_containers() -> None:
    state = masked_net().state_dict()
    assert "0.parametrizations.weight.0" in state._metadata  # type: ignore[attr-defined]
    metadata = bake_state_dict(state)._metadata  # type: ignore[attr-defined]
    assert metadata["1"] == state._metadata["1"]  # type: ignore[attr-defined]
    assert "0" in metadata
    assert not any("parametrizations" in key for key in metadata)
    assert dict(bake_state_dict(dict(state))).keys() == bake_state_dict(state).keys()


def test_bake_state_dict_keys_anywhere() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3), torch.tensor([1, 0, 1]))
    assert list(bake_state_dict(conv.state_dict())) == ["bias", "weight"]
    prefixed = {f"module._orig_mod.{k}": v for k, v in masked_net().state_dict().items()}
    baked = bake_state_dict(prefixed)
    assert "module._orig_mod.0.weight" in baked
    # A module that is itself named "parametrizations" is not a parametrization.
    holder = nn.Module()
    holder.parametrizations = nn.ModuleDict({"conv": apply_mask(nn.Conv1d(1, 1, 3), PLUS[1])})
    assert list(bake_state_dict(holder.state_dict())) == [
        "parametrizations.conv.bias",
        "parametrizations.conv.weight",
    ]


def test_bake_state_dict_passes_extra_state_and_plain_dicts_through() -> None:
    state = {"layer.weight": torch.ones(2), "layer._extra_state": {"anything": 1}}
    baked = bake_state_dict(state)
    assert baked == state
    assert bake_state_dict(bake_state_dict(masked_net().state_dict())).keys() == (
        bake_state_dict(masked_net().state_dict()).keys()
    )


@given(plan=mask_plans(), bias_mode=st.sampled_from(["keep", "zero", "channel"]))
def test_bake_state_dict_property(plan: MaskPlan, bias_mode: str) -> None:
    plain = copy.deepcopy(plan.model)
    masks = plan.masks
    if bias_mode == "channel":
        masks = {
            k: m
            for k, m in masks.items()
            if m is None or plan.model.get_submodule(k).bias is not None
        }
        if all(m is None for m in masks.values()):
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_masks(plan.model, masks, bias_mode=bias_mode)  # type: ignore[arg-type]
    plain.load_state_dict(bake_state_dict(plan.model.state_dict()), strict=True)
    assert torch.equal(plain(plan.x), plan.model(plan.x))


def test_exception_not_a_state_dict() -> None:
    rule = r"bake_state_dict expects a state_dict: a mapping of str keys to tensors"
    with pytest.raises(TypeError, match=f"{rule}.*Got list."):
        bake_state_dict([torch.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=f"{rule}.*Got the key 3 of type int."):
        bake_state_dict({3: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=f"{rule}.*Got 'epoch': int.$"):
        bake_state_dict({"w": torch.ones(1), "epoch": 3})
    with pytest.raises(
        TypeError,
        match=r"Got 'model': OrderedDict. A training checkpoint.*"
        r"checkpoint\['model'\]",
    ):
        bake_state_dict({"model": masked_net().state_dict(), "epoch": 3})


def test_exception_another_parametrization() -> None:
    linear = nn.Linear(3, 3)
    torch.nn.utils.parametrizations.orthogonal(linear)
    with pytest.raises(
        ValueError,
        match=r"exactly 'original' and '0.mask'.*Got "
        r"'parametrizations.weight' with keys \['.*'\]: another parametrization",
    ):
        bake_state_dict(linear.state_dict())
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    conv.parametrizations.weight[0].register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match=r"\['0.mask', '0.scale', 'original'\]"):
        bake_state_dict(conv.state_dict())
    state = apply_mask(nn.Conv2d(1, 1, 3), PLUS).state_dict()
    state["parametrizations.weight.original1"] = state.pop("parametrizations.weight.original")
    with pytest.raises(ValueError, match=r"\['0.mask', 'original1'\]"):
        bake_state_dict(state)


def test_exception_mask_not_bool_or_not_fitting_or_key_taken() -> None:
    state = apply_mask(nn.Conv2d(1, 1, 3), PLUS).state_dict()
    with pytest.raises(ValueError, match=r"a bool tensor. Got 'parametrizations.weight'.*float32"):
        bake_state_dict({**state, "parametrizations.weight.0.mask": PLUS.float()})
    with pytest.raises(
        ValueError,
        match=r"bake_state_dict expects a mask.*mask.shape=\(2,\) for "
        r"parametrizations.weight.original.shape=\(1, 1, 3, 3\)",
    ):
        bake_state_dict(
            {**state, "parametrizations.weight.0.mask": torch.ones(2, dtype=torch.bool)}
        )
    with pytest.raises(ValueError, match=r"plain key, which must be free.*also the key 'weight'"):
        bake_state_dict({**state, "weight": torch.ones(1, 1, 3, 3)})
