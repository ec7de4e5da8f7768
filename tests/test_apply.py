from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from maskparam import (
    BiasMask,
    FixedMask,
    apply_mask,
    get_mask,
    is_masked,
    remove_mask,
    set_mask,
)
from tests.strategies import ConvCase, conv_cases, masks_for

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
STACKED_PLUS = PLUS.expand(3, 3, 3)


def functional(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` recomputed with torch.nn.functional and an explicit weight."""
    bias = layer.bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    assert isinstance(layer, nn.modules.conv._ConvNd)
    ndim = len(layer.kernel_size)
    if layer.transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[ndim]
        return fn(
            x,
            weight,
            bias,
            layer.stride,
            layer.padding,
            layer.output_padding,
            layer.groups,
            layer.dilation,
        )
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    padding = layer.padding
    if layer.padding_mode != "zeros":
        pad = [p for p in reversed(layer.padding) for _ in range(2)]  # type: ignore[union-attr]
        x = F.pad(x, pad, mode=layer.padding_mode)
        padding = 0
    return conv(x, weight, bias, layer.stride, padding, layer.dilation, layer.groups)


def full_mask(layer: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    return mask.expand(layer.parametrizations.weight.original.shape)


def snapshot(module: nn.Module) -> tuple[type, dict[str, torch.Tensor]]:
    return type(module), {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: tuple[type, dict[str, torch.Tensor]]) -> None:
    cls, state = before
    assert type(module) is cls
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


# -- 1. zero at masked taps on every access ----------------------------------------------


def test_smoke() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    assert is_masked(conv)
    assert isinstance(conv, nn.Conv2d)
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert (conv.weight[:, :, PLUS] != 0).all()
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 3, 3, 3)


def test_zero_right_after_apply_before_any_forward() -> None:
    conv = nn.Conv3d(1, 4, 3)
    with torch.no_grad():
        conv.weight.fill_(7.0)
    apply_mask(conv, STACKED_PLUS)
    assert (conv.weight[:, :, ~STACKED_PLUS] == 0).all()
    assert (conv.weight[:, :, STACKED_PLUS] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_zero_after_to_dtype(dtype: torch.dtype) -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3), PLUS).to(dtype)
    assert conv.weight.dtype == dtype
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert get_mask(conv).dtype == torch.bool
    out = conv(torch.randn(1, 2, 5, 5, dtype=dtype))
    assert out.dtype == dtype


def test_zero_after_load_state_dict() -> None:
    source = apply_mask(nn.Conv2d(2, 2, 3), PLUS)
    with torch.no_grad():
        source.parametrizations.weight.original.fill_(3.0)  # masked taps too
    target = apply_mask(nn.Conv2d(2, 2, 3), PLUS)
    target.load_state_dict(source.state_dict(), strict=True)
    assert (target.weight[:, :, ~PLUS] == 0).all()
    assert (target.weight[:, :, PLUS] == 3.0).all()


def test_device_follows_weight(device: torch.device) -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3).to(device), PLUS)
    assert get_mask(conv).device.type == device.type
    moved = apply_mask(nn.Conv2d(1, 1, 3), PLUS).to(device)
    assert moved.parametrizations.weight[0].mask.device.type == device.type
    assert moved(torch.randn(1, 1, 4, 4, device=device)).device.type == device.type


# -- 2 + 4. exact zero gradients and functional equivalence, every layer option ---------


@given(case=conv_cases(dtype=torch.float64), data=st.data())
def test_masked_gradient_is_exactly_zero_and_output_matches_functional(
    case: ConvCase, data: st.DataObject
) -> None:
    layer, x = case.layer, case.x
    ndim = x.dim() - 2
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=ndim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-zero masks are allowed
        apply_mask(layer, mask)
    original = layer.parametrizations.weight.original
    full = full_mask(layer, mask)

    out = layer(x)
    expected = functional(layer, x, torch.where(full, original.detach(), 0))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    out.mul(torch.randn_like(out)).sum().backward()
    assert original.grad is not None
    assert (original.grad[~full] == 0).all()


@given(case=conv_cases(dtype=torch.float32, ndims=(1, 2)), data=st.data())
def test_masked_gradient_is_exactly_zero_float32(case: ConvCase, data: st.DataObject) -> None:
    layer, x = case.layer, case.x
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=x.dim() - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        apply_mask(layer, mask)
    layer(x).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None
    assert (grad[~full_mask(layer, mask)] == 0).all()


def test_linear_matches_functional() -> None:
    lin = nn.Linear(5, 3)
    mask = torch.rand(3, 5) > 0.5
    apply_mask(lin, mask)
    x = torch.randn(4, 5)
    w = torch.where(mask, lin.parametrizations.weight.original.detach(), 0)
    assert torch.equal(lin(x), F.linear(x, w, lin.bias))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding: str) -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3, padding=padding), PLUS)
    x = torch.randn(1, 2, 6, 6)
    w = torch.where(PLUS, conv.parametrizations.weight.original.detach(), 0)
    assert torch.equal(conv(x), F.conv2d(x, w, conv.bias, padding=padding))


def test_gradcheck_end_to_end_through_layer() -> None:
    conv = apply_mask(nn.Conv2d(2, 2, 3, padding=1, stride=2).double(), PLUS)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))
    assert torch.autograd.gradgradcheck(conv, (x,))


# -- 3. real training ---------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_stays_masked_after_training(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer], bias_mode: str
) -> None:
    mask = STACKED_PLUS.clone()
    per_channel = mask.expand(4, 2, 3, 3, 3).clone()
    per_channel[1] = False  # one fully masked filter
    conv = apply_mask(nn.Conv3d(2, 4, 3, padding=1), per_channel, bias_mode=bias_mode)  # type: ignore[arg-type]
    opt = make_opt(list(conv.parameters()))
    x, y = torch.randn(2, 2, 5, 5, 5), torch.randn(2, 4, 5, 5, 5)
    for _ in range(15):
        opt.zero_grad()
        F.mse_loss(conv(x), y).backward()
        opt.step()
        assert (conv.weight[~per_channel] == 0).all()
    assert (conv.weight[per_channel] != 0).all()
    if bias_mode == "zero":
        assert (conv.bias == 0).all()
    if bias_mode == "channel":
        assert conv.bias[1] == 0
        assert (conv(x)[:, 1] == 0).all()
        assert (conv.bias[[0, 2, 3]] != 0).all()


def test_output_and_gradients_ignore_original_at_masked_taps() -> None:
    torch.manual_seed(1)
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        conv.zero_grad()
        x.grad = None
        out = conv(x)
        out.square().sum().backward()
        assert x.grad is not None
        grad_w = conv.parametrizations.weight.original.grad
        assert grad_w is not None
        return out.detach(), x.grad.clone(), grad_w.clone()

    first = run()
    with torch.no_grad():
        conv.parametrizations.weight.original[:, :, ~PLUS] = torch.randn(3, 2, 4) * 100
    second = run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# -- 6. inf / NaN at masked taps ----------------------------------------------------------


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_inf_nan_at_masked_taps_stay_out(special: float) -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    with torch.no_grad():
        conv.parametrizations.weight.original[:, :, ~PLUS] = special
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = conv(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    grad_w = conv.parametrizations.weight.original.grad
    assert grad_w is not None
    assert torch.isfinite(grad_w).all()


# -- 7. state_dict and deepcopy -----------------------------------------------------------


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


# -- 8. remove_mask -----------------------------------------------------------------------


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


# -- bias modes ---------------------------------------------------------------------------


def test_bias_mode_keep_leaves_bias_alone() -> None:
    conv = nn.Conv2d(2, 3, 3)
    bias = conv.bias
    apply_mask(conv, PLUS)
    assert conv.bias is bias
    assert not parametrize.is_parametrized(conv, "bias")


def test_bias_mode_zero_holds_bias_at_zero_with_zero_gradient() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS, bias_mode="zero")
    assert (conv.bias == 0).all()
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    grad = conv.parametrizations.bias.original.grad
    assert grad is not None
    assert (grad == 0).all()
    assert isinstance(conv.parametrizations.bias[0], BiasMask)


def test_bias_mode_zero_on_layer_without_bias_is_a_no_op() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, bias=False), PLUS, bias_mode="zero")
    assert conv.bias is None
    remove_mask(conv)
    assert type(conv) is nn.Conv2d


def test_bias_mode_channel_conv_transpose_groups() -> None:
    # ConvTranspose weight is (in, out // groups, k): output channel g * 2 + j reads group g.
    conv = nn.ConvTranspose1d(4, 4, 3, groups=2)
    mask = torch.ones(4, 2, 3, dtype=torch.bool)
    mask[2:, 1] = False  # group 1, local output 1 -> global output channel 3
    apply_mask(conv, mask, bias_mode="channel")
    assert conv.parametrizations.bias[0].mask.tolist() == [True, True, True, False]
    out = conv(torch.randn(2, 4, 5))
    assert (out[:, 3] == 0).all()
    assert (out[:, :3] != 0).any()


def test_bias_mode_channel_linear() -> None:
    mask = torch.tensor([[1, 0], [0, 0], [0, 1]])
    lin = apply_mask(nn.Linear(2, 3), mask, bias_mode="channel")
    assert (lin(torch.randn(4, 2))[:, 1] == 0).all()


def test_set_mask_updates_channel_bias() -> None:
    conv = apply_mask(nn.Conv2d(1, 2, 3), torch.ones(2, 1, 1, 1), bias_mode="channel")
    assert (conv.bias != 0).all()
    set_mask(conv, torch.tensor([1, 0]).reshape(2, 1, 1, 1))
    assert conv.bias[1] == 0
    assert conv.bias[0] != 0
    assert (conv(torch.randn(1, 1, 4, 4))[:, 1] == 0).all()


# -- get / set / is ------------------------------------------------------------------------


def test_get_mask_returns_a_copy_in_given_shape() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    mask = get_mask(conv)
    assert torch.equal(mask, PLUS)
    mask.fill_(True)
    assert torch.equal(get_mask(conv), PLUS)


def test_set_mask_switches_taps_back_on_with_their_old_values() -> None:
    conv = nn.Conv2d(1, 1, 3, bias=False)
    original = conv.weight.detach().clone()
    apply_mask(conv, PLUS)
    set_mask(conv, torch.ones(3, 3))
    assert torch.equal(conv.weight, original)
    set_mask(conv, torch.ones(1, 1, 3, 3) * ~PLUS)  # a different shape is fine
    assert (conv.weight[:, :, PLUS] == 0).all()


def test_is_masked_on_other_names_and_modules() -> None:
    lin = apply_mask(nn.Linear(3, 3), torch.eye(3))
    assert is_masked(lin)
    assert not is_masked(lin, "bias")
    assert not is_masked(nn.ReLU())


def test_other_modules_and_parameter_names() -> None:
    emb = apply_mask(nn.Embedding(4, 3), torch.tensor([[1], [0], [1], [1]]))
    assert (emb(torch.tensor([1])) == 0).all()
    lstm = apply_mask(nn.LSTM(3, 2), torch.rand(8, 2) > 0.5, name="weight_hh_l0")
    out, _ = lstm(torch.randn(4, 1, 3))
    out.sum().backward()
    grad = lstm.parametrizations.weight_hh_l0.original.grad
    assert grad is not None
    assert (grad[~get_mask(lstm, "weight_hh_l0")] == 0).all()


def test_two_masked_tensors_on_one_module() -> None:
    lin = nn.Bilinear(2, 2, 2)
    apply_mask(lin, torch.rand(2, 2, 2) > 0.5)
    apply_mask(lin, torch.tensor([1, 0]), name="bias")
    assert lin.bias[1] == 0
    remove_mask(lin)
    assert is_masked(lin, "bias")
    remove_mask(lin, name="bias")
    assert type(lin) is nn.Bilinear


# -- 9. errors, raised before anything changes ------------------------------------------


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


# -- 10. the motivating scenario ---------------------------------------------------------


def test_motivating_scenario_counts_active_taps_inside_input() -> None:
    conv = nn.Conv3d(1, 8, 3, padding=1, bias=False)
    apply_mask(conv, STACKED_PLUS)
    with torch.no_grad():
        conv.parametrizations.weight.original.fill_(1.0)
    out = conv(torch.ones(1, 1, 6, 6, 6))

    expected = torch.zeros(6, 6, 6)
    for z in range(6):
        for y in range(6):
            for x in range(6):
                count = 0
                for dz in range(3):
                    for dy in range(3):
                        for dx in range(3):
                            inside = all(
                                0 <= c + d - 1 < 6 for c, d in ((z, dz), (y, dy), (x, dx))
                            )
                            count += int(bool(STACKED_PLUS[dz, dy, dx]) and inside)
                expected[z, y, x] = count
    assert expected[2, 2, 2] == 15
    assert expected[0, 0, 0] == 6
    for channel in range(8):
        assert torch.equal(out[0, channel], expected)


# -- no weight lost: what the mask hides comes back -------------------------------------


def _train(module: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_bake_false_restores_masked_taps_after_training(
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
) -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    opt = make_opt(list(conv.parameters()))
    _train(conv, opt, x, 3)  # optimizer state from before masking, too
    before_w, before_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    apply_mask(conv, PLUS, bias_mode="zero")
    _train(conv, opt, x, 5)
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
    _train(conv, opt, torch.randn(1, 1, 4), 5)
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
        _train(module, opt, torch.randn(2, 1, 5, 5, dtype=torch.float64), 3)
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
    _train(conv, opt, torch.randn(2, 1, 5, 5), 3)
    remove_mask(conv, bake=False)
    assert torch.equal(conv.weight[:, :, ~PLUS], pretrained.weight[:, :, ~PLUS])
    assert torch.equal(conv.bias, pretrained.bias)
