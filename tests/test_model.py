from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _forward
from maskparam import model as model_module
from maskparam.apply import BIAS_MODES, apply_mask, get_mask, is_masked, set_mask
from maskparam.masks import cross
from maskparam.model import LayerSummary, MaskSummary, apply_masks, mask_summary, remove_masks
from tests.strategies import ConvCase, MaskPlan, conv_cases, mask_plans, masks_for

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.skip = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + self.skip(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


THREE_BY_THREE = ["stem", "blocks.0.conv", "blocks.1.conv"]


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    types = {name: type(m) for name, m in model.named_modules()}
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(
    model: nn.Module, before: tuple[dict[str, type], dict[str, torch.Tensor]]
) -> None:
    types, state = before
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def masked_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_masked(m)]


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


def test_single_mask_with_include_type(net: Net) -> None:
    one = torch.ones(1, 1, dtype=torch.bool)
    names = apply_masks(net, one, include=nn.Conv2d)
    assert names == ["stem", "blocks.0.conv", "blocks.0.skip", "blocks.1.conv", "blocks.1.skip"]


def test_include_types_are_or_patterns_are_or_and_both_must_hold(net: Net) -> None:
    one = torch.ones(1, dtype=torch.bool)
    assert apply_masks(copy.deepcopy(net), one, include=[nn.Linear, nn.BatchNorm2d]) == [
        "blocks.0.bn",
        "blocks.1.bn",
        "head",
    ]
    assert apply_masks(copy.deepcopy(net), PLUS, include=["stem", "*.conv"]) == THREE_BY_THREE
    # A type and a pattern: Conv2d *and* inside blocks.1, so not the BatchNorm there.
    assert apply_masks(
        copy.deepcopy(net), torch.ones(1, 1), include=[nn.Conv2d, "blocks.1.*"]
    ) == [
        "blocks.1.conv",
        "blocks.1.skip",
    ]


def test_include_type_matches_subclasses_and_masked_modules_by_their_original_type() -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 1, 3), nn.Conv2d(1, 1, 3), nn.Conv1d(1, 1, 3))
    assert apply_masks(model, PLUS, include=nn.Conv2d) == ["0", "1"]
    assert isinstance(model[0], MyConv)


class UNet3d(nn.Module):
    """A 3-D U-Net's layer mix: 3x3x3 convs, a 2x2x2 down-sampling conv, a 1x1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 2, 3, padding=1)
        self.down = nn.Conv3d(2, 2, 2, stride=2)
        self.mid = nn.Conv3d(2, 2, 3, padding=1)
        self.up = nn.ConvTranspose3d(2, 2, 2, stride=2)
        self.head = nn.Conv3d(2, 1, 1)


CROSS3 = cross(3, ndim=3)


def is_3x3x3(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3)


def test_include_predicate_selects_by_kernel_size() -> None:
    model = UNet3d()
    assert apply_masks(model, CROSS3, include=is_3x3x3) == ["enc", "mid"]
    assert not is_masked(model.down)
    assert apply_masks(
        UNet3d(), CROSS3, include=lambda name, m: getattr(m, "kernel_size", None) == (3, 3, 3)
    ) == ["enc", "mid"]


def test_include_predicates_and_types_and_patterns_all_narrow() -> None:
    # Types are alternatives, patterns are alternatives, and every predicate must hold too.
    def not_mid(name: str, module: nn.Module) -> bool:
        return name != "mid"

    assert apply_masks(UNet3d(), CROSS3, include=[nn.Conv3d, is_3x3x3, not_mid]) == ["enc"]
    assert apply_masks(UNet3d(), CROSS3, include=["e*", "m*", is_3x3x3]) == ["enc", "mid"]


def test_include_predicate_sees_names_and_modules_once_each() -> None:
    seen: list[tuple[str, str]] = []

    def spy(name: str, module: nn.Module) -> bool:
        seen.append((name, type(module).__name__))
        return False

    with pytest.raises(ValueError, match=r"at least one layer.*include="):
        apply_masks(UNet3d(), CROSS3, include=spy)
    assert seen == [
        ("", "UNet3d"),
        ("enc", "Conv3d"),
        ("down", "Conv3d"),
        ("mid", "Conv3d"),
        ("up", "ConvTranspose3d"),
        ("head", "Conv3d"),
    ]


def test_include_predicate_exception_propagates_and_changes_nothing() -> None:
    model = UNet3d()
    before = snapshot(model)

    def boom(name: str, module: nn.Module) -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        apply_masks(model, CROSS3, include=boom)
    assert_unchanged(model, before)


def test_exception_misfit_under_include_shows_a_predicate() -> None:
    model = UNet3d()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"could not mask 'down' \(Conv3d\)") as info:
        apply_masks(model, CROSS3, include=nn.Conv3d)
    message = str(info.value)
    assert "kernel's spatial shape" in message
    assert (
        "include=lambda name, m: isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)"
        in message
    )
    assert_unchanged(model, before)
    # The suggested predicate works as written.
    suggestion = message.split("include=", 1)[1].rstrip(".")
    assert apply_masks(model, CROSS3, include=eval(suggestion, {"nn": nn})) == ["enc", "mid"]


def test_exception_misfit_under_include_without_a_kernel_shows_trailing_dims() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mask = torch.tensor([1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"could not mask '2' \(Linear\)") as info:
        apply_masks(model, mask, include=nn.Linear)
    hint = "include=lambda name, m: isinstance(m, nn.Linear) and m.weight.shape[-1:] == (4,)."
    assert str(info.value).endswith(hint)
    predicate = eval(hint.removeprefix("include=").rstrip("."), {"nn": nn})
    assert apply_masks(model, mask, include=predicate) == ["0"]


def test_exception_misfit_under_include_of_a_broadcasting_mask_asks_for_a_predicate() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3))
    per_output_channel = torch.tensor([1, 0, 1, 1]).view(4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"could not mask '1' \(Conv2d\)") as info:
        apply_masks(model, per_output_channel, include=nn.Conv2d)
    assert str(info.value).endswith(
        "To mask only the layers the mask fits, give include a predicate (name, module) -> "
        "bool that selects them."
    )


def test_exception_misfit_with_a_dict_has_no_include_hint() -> None:
    with pytest.raises(ValueError, match=r"kernel's spatial shape") as info:
        apply_masks(UNet3d(), {"down": CROSS3})
    assert "include=" not in str(info.value)


@pytest.mark.parametrize(
    ("include", "match"),
    [
        (nn.Conv2d(1, 1, 3), r"Got Conv2d\(1, 1"),
        ([nn.Conv2d, nn.ReLU()], r"which holds ReLU\(\)"),
    ],
)
def test_exception_include_module_instance_is_not_a_predicate(include: object, match: str) -> None:
    with pytest.raises(TypeError, match=r"module types .*predicates .*" + match):
        apply_masks(UNet3d(), CROSS3, include=include)  # type: ignore[arg-type]


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


def test_only_fixed_masks_count_as_masks() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    conv = nn.Conv2d(1, 1, 3)
    parametrize.register_parametrization(conv, "weight", Double())
    assert mask_summary(conv).rows == ()
    assert remove_masks(conv) == []
    assert parametrize.is_parametrized(conv, "weight")


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
