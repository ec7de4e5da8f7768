"""remove_mask bakes a plain layer, or gives the values under the mask back bitwise; no optimizer
step, load or copy loses them in between.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from maskparam import apply_mask, remove_mask, set_mask
from tests.helpers import OPTIMIZERS, PLUS, train

# -- bake: a plain layer again -------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv1d(2, 4, 3, groups=2),
        lambda: nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
        lambda: nn.Conv3d(1, 2, 3, padding=1),
        lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, groups=2),
        lambda: nn.Linear(3, 3),
    ],
)
def test_remove_mask_bake_gives_plain_layer_with_identical_outputs(
    make: Callable[[], nn.Module],
) -> None:
    layer = make()
    cls = type(layer)
    param = layer.weight
    mask = torch.arange(layer.weight.shape[-1]) % 2 == 0
    apply_mask(layer, mask)
    dims = {nn.Linear: (3,)}.get(cls)
    if dims is None:
        ndim = len(layer.kernel_size)  # type: ignore[arg-type]
        in_ch = layer.in_channels  # type: ignore[attr-defined]
        x = torch.randn(2, in_ch, *([7] * ndim))
    else:
        x = torch.randn(2, *dims)
    expected = layer(x)
    remove_mask(layer, bake=True)
    assert type(layer) is cls
    assert not hasattr(layer, "parametrizations")
    assert layer.weight is param
    assert torch.equal(layer(x), expected)


def test_remove_mask_keeps_optimizer_working() -> None:
    conv = nn.Conv2d(1, 1, 3, bias=False)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    apply_mask(conv, PLUS)
    conv(torch.randn(1, 1, 4, 4)).sum().backward()
    opt.step()
    remove_mask(conv)
    opt.zero_grad()
    before = conv.weight.detach().clone()
    conv(torch.randn(1, 1, 4, 4)).sum().backward()
    opt.step()
    assert not torch.equal(conv.weight, before)


def test_remove_mask_bake_false_restores_original_bitwise() -> None:
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    apply_mask(conv, PLUS, bias_mode="zero")
    conv(torch.randn(1, 2, 5, 5))
    remove_mask(conv, bake=False)
    assert type(conv) is nn.Conv2d
    assert torch.equal(conv.weight.view(torch.int32), weight.view(torch.int32))
    assert torch.equal(conv.bias, bias)


@pytest.mark.parametrize("bias_mode", ["zero", "channel"])
def test_remove_mask_bakes_bias(bias_mode: str) -> None:
    mask = torch.ones(3, 1, 3, 3, dtype=torch.bool)
    mask[2] = False
    conv = nn.Conv2d(2, 3, 3)
    bias_before = conv.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_mask(conv, mask, bias_mode=bias_mode)  # type: ignore[arg-type]
    x = torch.randn(1, 2, 5, 5)
    expected = conv(x)
    remove_mask(conv)
    assert type(conv) is nn.Conv2d
    assert torch.equal(conv(x), expected)
    if bias_mode == "zero":
        assert (conv.bias == 0).all()
    else:
        assert torch.equal(conv.bias[:2], bias_before[:2])
        assert conv.bias[2] == 0


# -- bake=False: what the mask hides comes back --------------------------------------------


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_bake_false_restores_masked_taps_after_training(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    opt = make_opt(list(conv.parameters()))
    train(conv, opt, x, 3)  # optimizer state from before masking, too
    before_w, before_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    apply_mask(conv, PLUS, bias_mode="zero")
    train(conv, opt, x, 5)
    stored = conv.parametrizations.weight.original
    trained_active = stored.detach()[:, :, PLUS].clone()
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight[:, :, ~PLUS], before_w[:, :, ~PLUS])
    assert torch.equal(conv.weight[:, :, PLUS], trained_active)
    assert torch.equal(conv.bias, before_b)  # held at zero the whole time: all of it hidden
    assert conv.weight is stored


def test_values_under_the_mask_never_move_in_an_optimizer_step() -> None:
    conv = nn.Conv1d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 2.0, 3.0]]]))
    apply_mask(conv, [1, 0, 1])
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    train(conv, opt, torch.randn(1, 1, 4), 5)
    stored = conv.parametrizations.weight.original
    assert stored[0, 0, 0] != 1.0  # the active taps trained...
    assert stored[0, 0, 1] == 2.0  # ...weight decay never reached the masked one
    assert conv.weight[0, 0, 1] == 0.0


def test_a_masked_layer_stores_one_tensor_and_its_mask() -> None:
    conv = apply_mask(nn.Conv2d(4, 8, 3), PLUS)
    assert sorted(conv.state_dict()) == [
        "bias",
        "parametrizations.weight.0.mask",
        "parametrizations.weight.original",
    ]
    assert not any(
        isinstance(v, torch.Tensor) and v.shape == conv.weight.shape
        for k, v in vars(conv.parametrizations.weight[0]).items()
    )


def test_set_mask_brings_back_stored_values_and_keeps_current_ones() -> None:
    conv = nn.Conv1d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 2.0, 3.0]]]))
    apply_mask(conv, [1, 0, 1])
    with torch.no_grad():
        conv.parametrizations.weight.original[0, 0, 0] = 10.0  # trained, say
    set_mask(conv, [0, 1, 1])  # tap 1 back on with its value 2.0; tap 0 keeps 10.0 stored
    assert torch.equal(conv.weight.detach(), torch.tensor([[[0.0, 2.0, 3.0]]]))
    set_mask(conv, [1, 1, 1])
    assert torch.equal(conv.weight.detach(), torch.tensor([[[10.0, 2.0, 3.0]]]))


def test_assigning_the_weight_sets_what_is_hidden() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), [1, 0, 1])
    conv.weight = torch.tensor([[[4.0, 5.0, 6.0]]])
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight.detach(), torch.tensor([[[4.0, 5.0, 6.0]]]))


def test_failed_weight_assignment_keeps_hidden_values() -> None:
    conv = nn.Conv1d(1, 1, 3, bias=False)
    before = conv.weight.detach().clone()
    apply_mask(conv, [1, 0, 1])
    with pytest.raises(ValueError, match="dtype"):
        conv.weight = torch.ones(1, 1, 3, dtype=torch.float64)
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight, before)


def test_stored_values_follow_dtype_device_copy_and_state_dict() -> None:
    conv = nn.Conv2d(1, 2, 3)
    before = conv.weight.detach().clone()
    apply_mask(conv, PLUS)
    conv.double()
    twin = copy.deepcopy(conv)
    other = apply_mask(nn.Conv2d(1, 2, 3).double(), PLUS)
    other.load_state_dict(conv.state_dict(), strict=True)
    for module in (conv, twin, other):
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
        train(module, opt, torch.randn(2, 1, 5, 5, dtype=torch.float64), 3)
        remove_mask(module, bake=False)
        assert torch.equal(module.weight[:, :, ~PLUS], before.double()[:, :, ~PLUS])


def test_legacy_extra_state_must_be_a_tensor_of_the_weights_shape() -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    for bad, phrase in (("not a tensor", "Got str"), (torch.ones(1), r"Got shape \(1,\)")):
        state = dict(conv.state_dict())
        state["parametrizations.weight.original"] = torch.full((1, 1, 3, 3), 7.0)
        state["parametrizations.weight.0._extra_state"] = bad
        with pytest.raises(RuntimeError, match=rf"weight.0._extra_state.*{phrase}"):
            conv.load_state_dict(state)
        for key, value in conv.state_dict().items():  # nothing of the layer was loaded
            assert torch.equal(value, before[key])


def test_plain_checkpoint_values_come_back_on_bake_false() -> None:
    pretrained = nn.Conv2d(1, 2, 3)
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS, bias_mode="zero")
    conv.load_state_dict(pretrained.state_dict(), strict=True)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    train(conv, opt, torch.randn(2, 1, 5, 5), 3)
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight[:, :, ~PLUS], pretrained.weight[:, :, ~PLUS])
    assert torch.equal(conv.bias, pretrained.bias)
