"""apply_masks: its three forms, all or nothing, and the layer named in every error."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _forward
from maskparam import model as model_module
from maskparam.apply import BIAS_MODES, apply_mask, get_mask, is_masked, set_mask
from maskparam.masks import cross
from maskparam.model import apply_masks, mask_summary, remove_masks
from tests.model_helpers import (
    CROSS3,
    PLUS,
    THREE_BY_THREE,
    Net,
    UNet3d,
    assert_unchanged,
    is_3x3x3,
    masked_names,
    snapshot,
)
from tests.strategies import MaskPlan, mask_plans


@pytest.fixture
def net() -> Net:
    return Net()


# -- apply_masks: the three forms ------------------------------------------------------------


def test_smoke(net: Net) -> None:
    names = apply_masks(net, dict.fromkeys(THREE_BY_THREE, PLUS))
    assert names == THREE_BY_THREE
    assert masked_names(net) == THREE_BY_THREE
    for name in names:
        weight = net.get_submodule(name).weight
        assert torch.all(weight[..., ~PLUS] == 0)
        assert torch.all(weight[..., PLUS] != 0)
    assert net(torch.randn(2, 1, 5, 5)).shape == (2, 3)


def test_dict_keeps_its_order_and_skips_none(net: Net) -> None:
    names = apply_masks(net, {"blocks.1.conv": PLUS, "stem": PLUS, "blocks.0.conv": None})
    assert names == ["blocks.1.conv", "stem"]
    assert masked_names(net) == ["stem", "blocks.1.conv"]


def test_dict_may_name_the_model_itself() -> None:
    conv = nn.Conv2d(1, 1, 3)
    assert apply_masks(conv, {"": PLUS}) == [""]
    assert is_masked(conv)


def test_callable_sees_every_module_but_no_parametrization_internals(net: Net) -> None:
    apply_mask(net.stem, PLUS)
    seen: list[tuple[str, type]] = []

    def pick(name: str, module: nn.Module) -> torch.Tensor | None:
        seen.append((name, parametrize.type_before_parametrizations(module)))
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and name != "stem":
            return PLUS
        return None

    assert apply_masks(net, pick) == ["blocks.0.conv", "blocks.1.conv"]
    expected = [(name, type(m)) for name, m in Net().named_modules()]
    assert seen == expected
    assert not any("parametrizations" in name for name, _ in seen)


def test_callable_exception_propagates_and_changes_nothing(net: Net) -> None:
    before = snapshot(net)

    def pick(name: str, module: nn.Module) -> torch.Tensor | None:
        if name == "blocks.1":
            raise RuntimeError("boom")
        return PLUS if name == "stem" else None

    with pytest.raises(RuntimeError, match=r"boom"):
        apply_masks(net, pick)
    assert_unchanged(net, before)


def test_each_layer_owns_its_mask(net: Net) -> None:
    mask = PLUS.clone()
    apply_masks(net, mask, include=["stem", "*.conv"])
    mask.zero_()  # The caller's tensor: no layer follows it.
    set_mask(net.stem, torch.ones(3, 3))
    assert torch.equal(get_mask(net.stem), torch.ones(3, 3, dtype=torch.bool))
    for name in THREE_BY_THREE[1:]:
        assert torch.equal(get_mask(net.get_submodule(name)), PLUS)


def test_all_zero_mask_warns_with_the_layer_name(net: Net) -> None:
    with pytest.warns(UserWarning, match=r"^'blocks.1.conv': The mask for Conv2d.weight is all"):
        apply_masks(net, {"stem": PLUS, "blocks.1.conv": torch.zeros(3, 3)})
    assert masked_names(net) == ["stem", "blocks.1.conv"]


def test_warnings_as_errors_mask_nothing(net: Net) -> None:
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"'blocks\.1\.conv'"):
            apply_masks(net, {"stem": PLUS, "blocks.1.conv": torch.zeros(3, 3)})
    assert_unchanged(net, before)


@pytest.mark.parametrize("bias_mode", BIAS_MODES)
def test_bias_mode_is_passed_to_every_layer(bias_mode: str) -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))

    channel_mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    channel_mask[0] = PLUS  # Output channel 1 keeps no tap: "channel" zeroes its bias.
    whole, single = build(), build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_masks(whole, {"0": PLUS, "1": channel_mask}, bias_mode=bias_mode)  # type: ignore[arg-type]
        apply_mask(single[0], PLUS, bias_mode=bias_mode)  # type: ignore[arg-type]
        apply_mask(single[1], channel_mask, bias_mode=bias_mode)  # type: ignore[arg-type]
    x = torch.randn(1, 1, 5, 5)
    assert torch.equal(whole(x), single(x))
    assert whole.state_dict().keys() == single.state_dict().keys()
    for a, b in zip(whole, single, strict=True):
        assert a.__dict__.keys() == b.__dict__.keys()
        assert type(a).__dict__.keys() == type(b).__dict__.keys()


@given(plan=mask_plans())
def test_same_as_apply_mask_layer_by_layer(plan: MaskPlan) -> None:
    whole, single = plan.model, copy.deepcopy(plan.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = apply_masks(whole, plan.masks)
        for name, mask in plan.masks.items():
            if mask is not None:
                apply_mask(single.get_submodule(name), mask)
    assert names == [name for name, mask in plan.masks.items() if mask is not None]
    state, expected = whole.state_dict(), single.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert torch.equal(whole(plan.x), single(plan.x))


# -- apply_masks: all or nothing ---------------------------------------------------------------


def test_exception_one_bad_layer_masks_nothing_and_is_named(net: Net) -> None:
    before = snapshot(net)
    masks = {"stem": PLUS, "blocks.0.conv": PLUS, "blocks.0.skip": PLUS}
    with pytest.raises(
        ValueError, match=r"could not mask 'blocks.0.skip' \(Conv2d\), so it masked"
    ):
        apply_masks(net, masks)
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match=r"'blocks.0.skip'.*kernel's spatial shape"):
        apply_masks(net, PLUS, include=nn.Conv2d)
    assert_unchanged(net, before)


def test_exception_already_masked_layer(net: Net) -> None:
    apply_mask(net.blocks[1].conv, PLUS)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"could not mask 'blocks.1.conv'.*already masked"):
        apply_masks(net, PLUS, include="*conv")
    assert_unchanged(net, before)


def test_exception_bias_mode_unknown_or_unfit(net: Net) -> None:
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"apply_masks expects bias_mode to be one of \["):
        apply_masks(net, PLUS, include="*conv", bias_mode="nope")  # type: ignore[arg-type]
    no_bias = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3, bias=False))
    with pytest.raises(ValueError, match=r"could not mask '1'.*bias_mode='channel' needs"):
        apply_masks(no_bias, PLUS, include=nn.Conv2d, bias_mode="channel")
    assert not is_masked(no_bias[0])
    assert_unchanged(net, before)


def test_exception_bad_mask_values_are_named(net: Net) -> None:
    with pytest.raises(ValueError, match=r"could not mask 'blocks.0.conv'.*all 0 or 1"):
        apply_masks(net, {"stem": PLUS, "blocks.0.conv": PLUS.float() * 2})
    with pytest.raises(TypeError, match=r"could not mask 'stem'.*expects the mask as a tensor"):
        apply_masks(net, {"stem": "cross"})
    assert masked_names(net) == []


def test_exception_unknown_names_with_suggestions(net: Net) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown names: 'blocks.0.cnv' \(did you mean "
        r"'blocks.0.conv'\?\), 'nothing'",
    ):
        apply_masks(net, {"stem": PLUS, "blocks.0.cnv": PLUS, "nothing": PLUS})
    assert masked_names(net) == []


def test_exception_same_module_twice() -> None:
    conv = nn.Conv2d(1, 1, 3)
    model = nn.Sequential(conv, conv)
    with pytest.raises(ValueError, match=r"same module under '0' and '1'"):
        apply_masks(model, {"0": PLUS, "1": PLUS})
    assert not is_masked(conv)


def test_exception_non_str_key(net: Net) -> None:
    with pytest.raises(TypeError, match=r"keys to be qualified module names.*Got 0 of type int"):
        apply_masks(net, {0: PLUS})


@pytest.mark.parametrize("form", ["dict", "callable"])
def test_exception_include_only_with_a_single_mask(net: Net, form: str) -> None:
    masks = {"stem": PLUS} if form == "dict" else (lambda name, module: None)
    with pytest.raises(ValueError, match=f"include only with a single mask.*with a {form}"):
        apply_masks(net, masks, include=nn.Conv2d)
    assert masked_names(net) == []


def test_exception_single_mask_needs_include(net: Net) -> None:
    with pytest.raises(ValueError, match=r"needs include= .*Got include=None"):
        apply_masks(net, PLUS)


@pytest.mark.parametrize(
    ("include", "match"),
    [
        (3, "Got 3."),
        ([nn.Conv2d, 3], "which holds 3"),
        (torch.Tensor, "which holds|Got <class 'torch.Tensor'>"),
        ([], r"non-empty list of them. Got \[\]"),
    ],
)
def test_exception_bad_include(net: Net, include: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        apply_masks(net, PLUS, include=include)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("masks", "include", "match"),
    [
        (PLUS, "blocks.*.conv2", r"include='blocks.\*.conv2'"),
        (PLUS, nn.Conv3d, "include=<class"),
        (lambda name, module: None, None, "callable, which returned None"),
        ({}, None, r"a dict with keys \[\]"),
        ({"stem": None}, None, r"a dict with keys \['stem'\]"),
    ],
)
def test_exception_nothing_selected(net: Net, masks: object, include: object, match: str) -> None:
    with pytest.raises(ValueError, match=f"at least one layer.*{match}"):
        apply_masks(net, masks, include=include)  # type: ignore[arg-type]


def test_exception_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"apply_masks expects a torch.nn.Module"):
        apply_masks("model", PLUS, include=nn.Conv2d)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"remove_masks expects a torch.nn.Module"):
        remove_masks([])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mask_summary expects a torch.nn.Module"):
        mask_summary(None)  # type: ignore[arg-type]


def test_a_failure_after_the_checks_rolls_back(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks run first, so this path needs a fault from outside them.
    before = snapshot(net)
    params = {id(p) for p in net.parameters()}
    calls: list[str] = []

    def flaky(module: nn.Module, mask: torch.Tensor, **kwargs: str) -> nn.Module:
        calls.append(type(module).__name__)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return apply_mask(module, mask, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_module, "apply_mask", flaky)
    with pytest.raises(RuntimeError, match=r"out of memory"):
        apply_masks(net, PLUS, include=["stem", "*conv"], bias_mode="channel")
    assert len(calls) == 3
    assert_unchanged(net, before)
    assert {id(p) for p in net.parameters()} == params  # The same Parameter objects.


def test_apply_masks_passes_execution_and_checks_it_first() -> None:
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="execution to be one of"):
        apply_masks(model, cross(3, ndim=3), include=nn.Conv3d, execution="fast")  # type: ignore[arg-type]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(is_masked(m) for m in model if isinstance(m, nn.Conv3d))
    x = torch.randn(1, 2, 6, 6, 6)
    dense = copy.deepcopy(model)
    apply_masks(dense, cross(3, ndim=3), include=nn.Conv3d)
    names = apply_masks(model, cross(3, ndim=3), include=nn.Conv3d, execution="taps")
    assert names == ["0", "2"]
    for name in names:
        assert _forward.EXECUTION_ATTR in model.get_submodule(name).__dict__
    torch.testing.assert_close(model(x), dense(x))


# -- messages name the layer's own class -------------------------------------------------------


def test_exception_already_masked_layer_is_named_by_its_own_class() -> None:
    model = UNet3d()
    apply_mask(model.mid, CROSS3)
    with pytest.raises(ValueError, match=r"could not mask 'mid' \(Conv3d\), so it masked"):
        apply_masks(model, CROSS3, include=is_3x3x3)


def test_exception_already_masked_layer_never_names_the_generated_class() -> None:
    model = UNet3d()
    apply_mask(model.mid, CROSS3)
    with pytest.raises(ValueError, match=r"already masked") as info:
        apply_masks(model, CROSS3, include=is_3x3x3)
    assert "Parametrized" not in str(info.value)
