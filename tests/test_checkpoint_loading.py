"""A masked model loads a plain checkpoint and keeps its masks, or a masked one with its masks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from maskparam.apply import apply_mask, get_mask, remove_mask, set_mask
from maskparam.checkpoint import bake_state_dict
from maskparam.model import apply_masks
from tests.checkpoint_helpers import CORNERS, LAYERS, PLUS, X, masked_net, plain_net, trained
from tests.strategies import ConvCase, conv_cases, masks_for

# -- a masked model loads a plain checkpoint and keeps its masks -------------------------------


@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_plain_checkpoint_loads_strict_and_keeps_the_masks(bias_mode: str) -> None:
    pretrained = trained(plain_net())
    net = masked_net(bias_mode=bias_mode)
    masks = {name: get_mask(net.get_submodule(name)) for name in LAYERS}
    result = net.load_state_dict(pretrained.state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    for name, mask in masks.items():
        layer = net.get_submodule(name)
        assert torch.equal(get_mask(layer), mask)
        original = layer.parametrizations.weight.original
        assert torch.equal(original, pretrained.get_submodule(name).weight)  # all of it
    # The same as masking after loading: the pretrained-then-mask order.
    other = plain_net()
    other.load_state_dict(pretrained.state_dict())
    for name, mask in masks.items():
        apply_mask(other.get_submodule(name), mask, bias_mode="zero" if name == "6" else bias_mode)  # type: ignore[arg-type]
    assert torch.equal(net.eval()(X), other.eval()(X))
    state, expected = net.state_dict(), other.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_plain_checkpoint_then_unmask_gives_the_pretrained_weights_back() -> None:
    pretrained = trained(plain_net())
    net = masked_net()
    net.load_state_dict(pretrained.state_dict())
    for layer in (net[0], net[3], net[4], net[6]):
        remove_mask(layer, bake=False)
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pretrained.state_dict().items())


def test_plain_checkpoint_into_a_partly_masked_model_with_assign() -> None:
    pretrained = trained(plain_net())
    net = plain_net()
    apply_mask(net[3], PLUS)
    net.load_state_dict(pretrained.state_dict(), strict=True, assign=True)
    original = net[3].parametrizations.weight.original
    assert isinstance(original, nn.Parameter)
    assert torch.equal(original, pretrained[3].weight)
    assert torch.equal(get_mask(net[3]), PLUS)
    assert torch.all(net[3].weight[..., ~PLUS] == 0)


def test_plain_checkpoint_missing_a_layer_reports_it() -> None:
    state = plain_net().state_dict()
    del state["3.weight"]
    net = masked_net()
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert "3.parametrizations.weight.original" in result.missing_keys
    assert not any(k.startswith("0.") for k in result.missing_keys)
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\).*3.parametrizations.weight.original"
    ):
        net.load_state_dict(state)


def test_plain_key_of_a_tensor_with_another_parametrization_is_left_to_torch() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    parametrize.register_parametrization(conv, "bias", Double())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"bias\""):
        conv.load_state_dict(nn.Conv2d(1, 1, 3).state_dict())


@given(case=conv_cases(), data=st.data())
def test_plain_checkpoint_property(case: ConvCase, data: st.DataObject) -> None:
    layer = case.layer
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=case.x.dim() - 2))
    pretrained = copy.deepcopy(layer)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(-3.0).add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_mask(layer, mask)
        expected = apply_mask(copy.deepcopy(pretrained), mask)
    layer.load_state_dict(pretrained.state_dict(), strict=True)
    assert torch.equal(get_mask(layer), mask)
    assert torch.equal(layer(case.x), expected(case.x))


# -- a masked model loads a masked checkpoint with the checkpoint's masks ----------------------


def test_masked_checkpoint_brings_its_masks() -> None:
    source = trained(masked_net(PLUS))
    net = masked_net(CORNERS)
    net.load_state_dict(source.state_dict(), strict=True)
    for name in LAYERS:
        assert torch.equal(get_mask(net.get_submodule(name)), get_mask(source.get_submodule(name)))
    assert torch.equal(net.eval()(X), source(X))


def test_masked_checkpoint_mask_of_another_shape() -> None:
    full = torch.rand(3, 2, 3, 3) > 0.5
    source = apply_mask(nn.Conv2d(2, 3, 3), full)
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(get_mask(target), full)
    assert torch.equal(target(X), source(X))
    back = apply_mask(nn.Conv2d(2, 3, 3), full)
    back.load_state_dict(apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict())
    assert torch.equal(get_mask(back), PLUS)


def test_masked_checkpoint_does_not_leak_into_layers_that_shared_a_mask() -> None:
    shared = PLUS.clone()
    net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    apply_masks(net, shared, include=nn.Conv2d)
    set_mask(net[0], shared)
    set_mask(net[1], shared)  # Now both layers hold the very same tensor.
    source = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    apply_masks(source, {"0": PLUS, "1": CORNERS})
    net.load_state_dict(source.state_dict())
    assert torch.equal(get_mask(net[0]), PLUS)
    assert torch.equal(get_mask(net[1]), CORNERS)
    assert torch.equal(shared, PLUS)


def test_masked_checkpoint_with_a_0_1_float_mask_is_accepted() -> None:
    state = apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict()
    state["parametrizations.weight.0.mask"] = CORNERS.double()
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    target.load_state_dict(state)
    assert get_mask(target).dtype == torch.bool
    assert torch.equal(get_mask(target), CORNERS)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (PLUS.float() * 0.5, "all 0 or 1"),
        (torch.ones(2, 2, dtype=torch.bool), r"kernel's spatial shape.*mask.shape=\(2, 2\)"),
    ],
)
def test_exception_masked_checkpoint_with_a_bad_mask(bad: torch.Tensor, match: str) -> None:
    state = apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict()
    state["parametrizations.weight.0.mask"] = bad
    target = apply_mask(nn.Conv2d(2, 3, 3), CORNERS)
    with pytest.raises(
        RuntimeError,
        match=f"While loading 'parametrizations.weight.0.mask': load_state_dict.*{match}",
    ):
        target.load_state_dict(state)
    assert torch.equal(get_mask(target), CORNERS)


def test_checkpoints_from_the_cpu_load_onto_the_model_device(device: torch.device) -> None:
    source = apply_mask(nn.Conv2d(2, 3, 3), CORNERS)
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS).to(device)
    target.load_state_dict(nn.Conv2d(2, 3, 3).state_dict())  # plain, on the CPU
    assert get_mask(target).device == target.parametrizations.weight.original.device == device
    target.load_state_dict(source.state_dict())  # masked, on the CPU
    assert get_mask(target).device.type == device.type
    assert torch.equal(get_mask(target).cpu(), CORNERS)
    baked = bake_state_dict(target.state_dict())
    assert baked["weight"].device.type == device.type
    assert torch.equal(baked["weight"].cpu(), source.weight.detach())
