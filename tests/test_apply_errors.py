"""Every error of apply_mask, remove_mask, get_mask and set_mask is raised before anything
changes: the layer is left exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import FixedMask, apply_mask, get_mask, is_masked, remove_mask, set_mask
from tests.helpers import PLUS


def snapshot(module: nn.Module) -> tuple[type, dict[str, torch.Tensor]]:
    return type(module), {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: tuple[type, dict[str, torch.Tensor]]) -> None:
    cls, state = before
    assert type(module) is cls
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_exception_mask_does_not_fit() -> None:
    conv = nn.Conv2d(2, 3, 3)
    before = snapshot(conv)
    with pytest.raises(ValueError, match="kernel's spatial shape") as info:
        apply_mask(conv, torch.ones(5, 5))
    assert "(5, 5)" in str(info.value)
    assert "(3, 2, 3, 3)" in str(info.value)
    assert_unchanged(conv, before)
    with pytest.raises(ValueError, match="kernel's spatial shape"):
        apply_mask(conv, torch.ones(1, 3, 2, 3, 3))  # more dims than the weight
    assert_unchanged(conv, before)


@pytest.mark.parametrize(
    ("mask", "match"),
    [(torch.tensor([[0.5] * 3] * 3), "all 0 or 1"), (torch.full((3, 3), float("nan")), "NaN")],
)
def test_exception_non_binary_mask(mask: torch.Tensor, match: str) -> None:
    conv = nn.Conv2d(2, 3, 3)
    before = snapshot(conv)
    with pytest.raises(ValueError, match=match):
        apply_mask(conv, mask)
    assert_unchanged(conv, before)


def test_exception_missing_parameter_and_buffer() -> None:
    conv = nn.Conv2d(2, 3, 3)
    before = snapshot(conv)
    with pytest.raises(ValueError, match="parameter named 'kernel'") as info:
        apply_mask(conv, PLUS, name="kernel")
    assert "['weight', 'bias']" in str(info.value)
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="buffer"):
        apply_mask(bn, torch.ones(3), name="running_mean")
    assert_unchanged(conv, before)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        apply_mask(torch.zeros(3), PLUS)  # type: ignore[arg-type]


def test_exception_already_masked() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    before = snapshot(conv)
    with pytest.raises(ValueError, match="already masked") as info:
        apply_mask(conv, torch.ones(3, 3))
    assert "set_mask" in str(info.value)
    assert_unchanged(conv, before)


def test_exception_other_parametrization_present() -> None:
    lin = nn.Linear(3, 3)
    nn.utils.parametrizations.orthogonal(lin)
    with pytest.raises(ValueError, match="plain parameter"):
        apply_mask(lin, torch.eye(3))
    lin2 = apply_mask(nn.Linear(3, 3), torch.eye(3))
    parametrize.register_parametrization(lin2, "weight", nn.Identity())
    with pytest.raises(ValueError, match="only parametrization"):
        remove_mask(lin2)


def test_exception_unknown_bias_mode() -> None:
    conv = nn.Conv2d(2, 3, 3)
    before = snapshot(conv)
    with pytest.raises(ValueError, match="bias_mode") as info:
        apply_mask(conv, PLUS, bias_mode="sometimes")  # type: ignore[arg-type]
    assert "'keep', 'zero', 'channel'" in str(info.value)
    assert_unchanged(conv, before)


def test_exception_remove_unmasked() -> None:
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="not masked"):
        remove_mask(conv)
    with pytest.raises(ValueError, match="not masked"):
        get_mask(conv)
    with pytest.raises(ValueError, match="not masked"):
        set_mask(conv, PLUS)


def test_exception_channel_mode_without_bias() -> None:
    conv = nn.Conv2d(2, 3, 3, bias=False)
    before = snapshot(conv)
    with pytest.raises(ValueError, match="needs a layer with a bias"):
        apply_mask(conv, PLUS, bias_mode="channel")
    assert_unchanged(conv, before)


def test_exception_bias_mode_on_other_names_or_unknown_layers() -> None:
    lstm = nn.LSTM(3, 2)
    with pytest.raises(ValueError, match="masking a layer's weight"):
        apply_mask(lstm, torch.ones(8, 2), name="weight_hh_l0", bias_mode="zero")
    emb = nn.Embedding(3, 2)
    emb.bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Conv1d/2d/3d"):
        apply_mask(emb, torch.ones(3, 2), bias_mode="channel")
    assert not is_masked(emb)


def test_exception_set_mask_bad_mask_leaves_old_mask() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="channel")
    before = snapshot(conv)
    with pytest.raises(ValueError, match="kernel's spatial shape"):
        set_mask(conv, torch.ones(4, 4))
    with pytest.raises(ValueError, match="all 0 or 1"):
        set_mask(conv, torch.full((3, 3), 2))
    assert_unchanged(conv, before)


def test_exception_bias_held_by_bias_mode() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="channel")
    with pytest.raises(ValueError, match="held by bias_mode='channel'"):
        remove_mask(conv, name="bias")
    with pytest.raises(ValueError, match="held by bias_mode='channel'"):
        set_mask(conv, torch.ones(3), name="bias")
    assert torch.equal(get_mask(conv, "bias"), torch.ones(3, dtype=torch.bool))


def test_all_zero_mask_warns_but_applies() -> None:
    conv = nn.Conv2d(2, 3, 3)
    with pytest.warns(UserWarning, match="all zero"):
        apply_mask(conv, torch.zeros(3, 3))
    assert (conv.weight == 0).all()
    with pytest.warns(UserWarning, match="all zero"):
        set_mask(conv, torch.zeros(3, 3))


def test_failed_call_leaves_fixed_mask_instances_untouched() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    fm = conv.parametrizations.weight[0]
    with pytest.raises(ValueError, match="kernel's spatial shape"):
        set_mask(conv, torch.ones(2, 2))
    assert conv.parametrizations.weight[0] is fm
    assert isinstance(fm, FixedMask)
