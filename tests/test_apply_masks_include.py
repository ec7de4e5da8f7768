"""apply_masks(include=...): types, name patterns and predicates select layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maskparam.apply import is_masked
from maskparam.model import apply_masks
from tests.model_helpers import (
    CROSS3,
    PLUS,
    THREE_BY_THREE,
    Net,
    UNet3d,
    assert_unchanged,
    is_3x3x3,
    snapshot,
)


@pytest.fixture
def net() -> Net:
    return Net()


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
