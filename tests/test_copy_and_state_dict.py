"""A masked layer through state_dict and copy.deepcopy: the same outputs, independent copies."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import apply_mask, is_masked, remove_mask
from tests.helpers import PLUS


def test_state_dict_roundtrip() -> None:
    source = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="channel")
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="channel")
    state = source.state_dict()
    assert "parametrizations.weight.0.mask" in state
    target.load_state_dict(state, strict=True)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(source(x), target(x))


def test_deepcopy() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="zero")
    twin = copy.deepcopy(conv)
    assert type(twin) is not type(conv)  # each its own class
    assert twin.parametrizations.weight.original is not conv.parametrizations.weight.original
    with torch.no_grad():
        twin.parametrizations.weight.original.add_(1.0)
    assert not torch.equal(twin.weight, conv.weight)

    remove_mask(twin)
    x = torch.randn(1, 2, 5, 5)
    assert type(twin) is nn.Conv2d
    assert is_masked(conv)
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    conv(x)  # the original still works
    remove_mask(conv)
    assert type(conv) is nn.Conv2d


def test_deepcopy_inside_model_and_cached() -> None:
    model = nn.Sequential(apply_mask(nn.Conv1d(1, 1, 3, bias=False), [1, 0, 1]))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].parametrizations.weight.original.fill_(2.0)
        model[0].parametrizations.weight.original.fill_(1.0)
    with parametrize.cached():
        assert torch.equal(model[0].weight, torch.tensor([[[1.0, 0.0, 1.0]]]))
        assert torch.equal(twin[0].weight, torch.tensor([[[2.0, 0.0, 2.0]]]))


def test_deepcopy_keeps_hooks_and_shared_references() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3), [1, 1, 0])
    calls: list[int] = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    model = nn.ModuleList([conv, conv])
    twin = copy.deepcopy(model)
    assert twin[0] is twin[1]
    twin[0](torch.randn(1, 1, 4))
    assert calls == [1]
