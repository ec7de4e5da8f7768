from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from maskparam import _forward, masks, partial
from maskparam.apply import apply_mask, get_mask, is_masked, remove_mask, set_mask
from maskparam.partial import PartialSequential, coverage, partial_conv
from tests.strategies import conv_cases, masks_for, validities

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
BOX = torch.ones(3, 3, dtype=torch.bool)
# PixelCNN type A: the taps strictly before the centre in raster order.
TYPE_A = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
MODES = ["valid", "partial"]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference(
    layer: nn.Module, x: torch.Tensor, validity: torch.Tensor | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, output validity, coverage in weight entries) by looping over kernel offsets.

    Written from the definition, independently of the code under test: zero padding for
    every padding mode, single-channel validity broadcast to every input channel.
    """
    assert isinstance(layer, nn.modules.conv._ConvNd)
    ndim = len(layer.kernel_size)
    mask = get_mask(layer).expand(layer.parametrizations.weight.original.shape)
    weight = torch.where(mask, layer.parametrizations.weight.original.detach(), 0)
    n, c_in, *spatial = x.shape
    c_out, groups = weight.shape[0], layer.groups
    cin_g, cout_g = c_in // groups, c_out // groups
    if validity is None:
        validity = torch.ones(n, 1, *spatial, dtype=torch.bool)
    v = validity.expand(n, c_in, *spatial)
    pad = [p for p in reversed(layer.padding) for _ in range(2)]  # type: ignore[union-attr]
    xv = F.pad(torch.where(v, x, 0), pad)
    vp = F.pad(v.to(x.dtype), pad)
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st_ + 1
        for s, p, d, k, st_ in zip(
            spatial, layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True
        )
    ]
    raw = torch.zeros(n, c_out, *size, dtype=x.dtype)
    cov = torch.zeros(n, c_out, *size, dtype=x.dtype)
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        window = tuple(
            slice(o * d, o * d + st_ * (m - 1) + 1, st_)
            for o, d, st_, m in zip(offset, layer.dilation, layer.stride, size, strict=True)
        )
        patch_x = xv[(..., *window)]
        patch_v = vp[(..., *window)]
        for o in range(c_out):
            group = slice((o // cout_g) * cin_g, (o // cout_g + 1) * cin_g)
            w = weight[(o, slice(None), *offset)]
            k = mask[(o, slice(None), *offset)].to(x.dtype)
            raw[:, o] += torch.einsum("c,nc...->n...", w, patch_x[:, group])
            cov[:, o] += torch.einsum("c,nc...->n...", k, patch_v[:, group])
    total = mask.flatten(1).sum(1).to(x.dtype).view(1, -1, *[1] * ndim)
    valid = cov > 0
    bias = 0 if layer.bias is None else layer.bias.detach().view(1, -1, *[1] * ndim)
    if mode == "partial":
        out = torch.where(valid, raw * total / cov.clamp_min(1) + bias, 0)
    else:
        out = raw + torch.where(valid, bias, 0)
    return out, valid, cov


def masked(layer: nn.Module, mask: torch.Tensor | list[int], mode: str) -> nn.Module:
    return apply_mask(layer, mask, bias_mode=mode)  # type: ignore[arg-type]


def masked_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The standard masked conv: what the layer computes with bias_mode='keep'."""
    assert isinstance(layer, nn.modules.conv._ConvNd)
    fn = FCONV[len(layer.kernel_size)]
    return fn(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


class Functional(nn.Module):
    """partial_conv as a module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, conv: nn.Module, validity: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.validity = validity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return partial_conv(self.conv, x, self.validity)[0]


# -- smoke and the drop-in forward --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_smoke(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    assert conv.__dict__[_forward.BIAS_MODE_ATTR] == mode
    x = torch.randn(2, 2, 5, 5)
    out = conv(x)
    assert out.shape == (2, 3, 5, 5)
    explicit, valid = partial_conv(conv, x, torch.ones(2, 1, 5, 5, dtype=torch.bool))
    assert torch.equal(out, explicit)
    assert valid.dtype == torch.bool
    assert valid.all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_all_valid_without_padding_is_the_masked_conv(mode: str, ndim: int) -> None:
    mask = torch.rand((3,) * ndim) < 0.6
    mask.view(-1)[0] = True
    conv = masked(CONV[ndim](4, 6, 3, groups=2, dilation=1), mask, mode)
    x = torch.randn(2, 4, *(6,) * ndim)
    expected = masked_conv(conv, x)
    torch.testing.assert_close(conv(x), expected)
    for channels in (1, 4):
        validity = torch.ones(2, channels, *(6,) * ndim, dtype=torch.bool)
        out, valid = partial_conv(conv, x, validity)
        torch.testing.assert_close(out, expected)
        assert valid.all()


def test_scale_map_of_box_kernel_with_padding() -> None:
    conv = masked(nn.Conv2d(1, 1, 3, padding=1, bias=False), BOX, "partial")
    all_valid = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    scale = 9 / coverage(conv, all_valid)[0, 0]
    expected = torch.ones(5, 6)
    expected[[0, -1], :] = 1.5
    expected[:, [0, -1]] = 1.5
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = 2.25
    assert torch.equal(scale, expected)
    x = torch.randn(1, 1, 5, 6)
    torch.testing.assert_close(conv(x), masked_conv(conv, x) * expected)
    with torch.no_grad():
        conv.weight = torch.ones(1, 1, 3, 3)
    # With ones everywhere each output sums its valid taps, and the scale restores all nine.
    assert torch.equal(conv(torch.ones(1, 1, 5, 6)), torch.full((1, 1, 5, 6), 9.0))


@pytest.mark.parametrize("mode", MODES)
def test_holes_give_exactly_zero(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    with torch.no_grad():
        conv.bias.fill_(5.0)
    validity = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    validity[..., 1:6, 1:6] = False  # a 5x5 hole: its inner 3x3 sees nothing valid
    x = torch.randn(1, 2, 7, 7)
    x[:, :, 1:6, 1:6] = float("nan")  # what a hole holds never reaches the output
    out, valid = partial_conv(conv, x, validity)
    dark = torch.zeros(7, 7, dtype=torch.bool)
    dark[2:5, 2:5] = True
    assert torch.equal(valid[0, 0], ~dark)
    assert (out[:, :, dark] == 0).all()
    assert torch.isfinite(out).all()
    assert (out[:, :, ~dark] != 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", [PLUS, TYPE_A], ids=["plus", "type_a"])
def test_zero_weight_outputs_bias_where_covered(mode: str, mask: torch.Tensor) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), mask, mode)
    with torch.no_grad():
        conv.weight = torch.zeros(3, 2, 3, 3)
    validity = torch.rand(2, 1, 6, 6) < 0.5
    out, valid = partial_conv(conv, torch.randn(2, 2, 6, 6), validity)
    expected = conv.bias.detach().view(1, 3, 1, 1) * valid
    assert torch.equal(out, expected)
    _, expected_valid, _ = reference(conv, torch.randn(2, 2, 6, 6), validity, mode)
    assert torch.equal(valid.expand_as(expected_valid), expected_valid)
    assert not valid.all()
    assert valid.any()


def test_cross_kernel_ignores_a_valid_diagonal_neighbour() -> None:
    validity = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    validity[0, 0, 1, 1] = True  # the diagonal neighbour of (2, 2)
    box = nn.Conv2d(1, 1, 3, padding=1)
    cross = masked(nn.Conv2d(1, 1, 3, padding=1), PLUS, "valid")
    assert coverage(box, validity)[0, 0, 2, 2] == 1
    assert coverage(cross, validity)[0, 0, 2, 2] == 0
    for mode in MODES:
        conv = masked(nn.Conv2d(1, 1, 3, padding=1), PLUS, mode)
        with torch.no_grad():
            conv.bias.fill_(1.0)
        out, valid = partial_conv(conv, torch.randn(1, 1, 5, 5), validity)
        assert not valid[0, 0, 2, 2]
        assert out[0, 0, 2, 2] == 0
        assert valid[0, 0, 1, 2]  # the one above sees it through the cross


@pytest.mark.parametrize("mode", MODES)
def test_pixelcnn_type_a_first_position_has_no_coverage(mode: str) -> None:
    conv = masked(nn.Conv2d(1, 2, 3, padding=1), TYPE_A, mode)
    with torch.no_grad():
        conv.bias.fill_(3.0)
    x = torch.randn(1, 1, 4, 4)
    out = conv(x)
    assert (out[0, :, 0, 0] == 0).all()  # not the bias: every active tap is in the padding
    cov = coverage(conv, torch.ones(1, 1, 4, 4, dtype=torch.bool))[0, 0]
    assert cov[0, 0] == 0
    assert (cov.flatten()[1:] > 0).all()
    expected, _, _ = reference(conv, x, None, mode)
    torch.testing.assert_close(out, expected)


# -- agreement with a reference implementation ---------------------------------------------


@given(data=st.data(), mode=st.sampled_from(MODES))
def test_matches_reference(data: st.DataObject, mode: str) -> None:
    case = data.draw(conv_cases(transposed=False))
    layer = case.layer
    shape = tuple(layer.weight.shape)
    mask = data.draw(masks_for(shape=shape, spatial_dims=len(shape) - 2))
    validity = data.draw(validities(shape=tuple(case.x.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-zero masks are part of the test
        masked(layer, mask, mode)
    out, valid = partial_conv(layer, case.x, validity)
    expected, expected_valid, cov = reference(layer, case.x, validity, mode)
    torch.testing.assert_close(out, expected)
    assert torch.equal(valid.expand_as(expected_valid), expected_valid)
    if validity is None:
        torch.testing.assert_close(layer(case.x), expected)
    else:
        counts = coverage(layer, validity)
        if validity.shape[1] == 1:
            cov = cov / layer.weight.shape[1]
        torch.testing.assert_close(counts.expand_as(cov), cov)


@pytest.mark.parametrize("mode", MODES)
def test_single_channel_validity_is_the_same_on_every_channel(mode: str) -> None:
    mask = torch.rand(4, 2, 3, 3) < 0.5  # per element, so channels count differently
    conv = masked(nn.Conv2d(4, 4, 3, padding=1, groups=2), mask, mode)
    x = torch.randn(2, 4, 6, 6)
    single = torch.rand(2, 1, 6, 6) < 0.5
    out_1, valid_1 = partial_conv(conv, x, single)
    out_c, valid_c = partial_conv(conv, x, single.expand(2, 4, 6, 6))
    torch.testing.assert_close(out_1, out_c)
    assert torch.equal(valid_1.expand_as(valid_c), valid_c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_is_invalid_for_every_padding_mode(mode: str, padding_mode: str) -> None:
    zeros = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    other = masked(nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), PLUS, mode)
    other.load_state_dict(zeros.state_dict())
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(other(x), zeros(x))
    validity = torch.rand(1, 2, 5, 5) < 0.5
    assert torch.equal(partial_conv(other, x, validity)[0], partial_conv(zeros, x, validity)[0])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_same_padding_with_an_even_kernel(padding_mode: str) -> None:
    # padding="same" pads a 4-tap kernel asymmetrically; all of it is invalid input.
    conv = masked(
        nn.Conv1d(2, 3, 4, padding="same", padding_mode=padding_mode),
        [1, 1, 1, 1],
        "valid",
    )
    x = torch.randn(2, 2, 9)
    expected = F.conv1d(x, conv.weight, conv.bias, padding="same")
    torch.testing.assert_close(conv(x), expected)
    cov = coverage(conv, torch.ones(1, 1, 9, dtype=torch.bool))[0, 0]
    # One padded position on the left, two on the right.
    assert cov.tolist() == [3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0]


@pytest.mark.parametrize("mode", MODES)
def test_masks_per_output_channel_give_coverage_per_channel(mode: str) -> None:
    mask = torch.stack([PLUS, TYPE_A, BOX]).unsqueeze(1)  # (3, 1, 3, 3)
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), mask, mode)
    x = torch.randn(1, 2, 5, 5)
    validity = torch.rand(1, 1, 5, 5) < 0.5
    out, valid = partial_conv(conv, x, validity)
    assert valid.shape == (1, 3, 5, 5)
    for o, single in enumerate((PLUS, TYPE_A, BOX)):
        one = masked(nn.Conv2d(2, 1, 3, padding=1), single, mode)
        with torch.no_grad():
            one.weight = conv.weight[o : o + 1]
            one.bias.copy_(conv.bias[o : o + 1])
        out_o, valid_o = partial_conv(one, x, validity)
        torch.testing.assert_close(out[:, o : o + 1], out_o)
        assert torch.equal(valid[:, o : o + 1], valid_o)


def test_validity_out_channels() -> None:
    x = torch.randn(1, 4, 5, 5)
    single = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    multi = torch.ones(1, 4, 5, 5, dtype=torch.bool)
    shared = masked(nn.Conv2d(4, 6, 3), PLUS, "valid")
    assert partial_conv(shared, x, single)[1].shape[1] == 1
    assert partial_conv(shared, x, multi)[1].shape[1] == 1
    grouped = masked(nn.Conv2d(4, 6, 3, groups=2), PLUS, "valid")
    assert partial_conv(grouped, x, single)[1].shape[1] == 1
    assert partial_conv(grouped, x, multi)[1].shape[1] == 6
    per_channel = masked(nn.Conv2d(4, 6, 3), torch.ones(6, 1, 1, 1), "valid")
    assert partial_conv(per_channel, x, single)[1].shape[1] == 6


@pytest.mark.parametrize("mode", MODES)
def test_unbatched_and_batch_broadcast(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode)
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(conv(x[0]), conv(x[:1])[0])
    validity = torch.rand(1, 1, 5, 5) < 0.5
    out, valid = partial_conv(conv, x, validity)
    out_n, valid_n = partial_conv(conv, x, validity.expand(3, 1, 5, 5))
    torch.testing.assert_close(out, out_n)
    assert torch.equal(valid.expand_as(valid_n), valid_n)
    out_0, valid_0 = partial_conv(conv, x[0], validity[0])
    torch.testing.assert_close(out_0, out[0])
    assert torch.equal(valid_0, valid[0])
    assert torch.equal(coverage(conv, validity[0]), coverage(conv, validity)[0])


@pytest.mark.parametrize("mode", MODES)
def test_device(mode: str, device: torch.device) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode)
    x = torch.randn(2, 2, 5, 5)
    validity = torch.rand(2, 1, 5, 5) < 0.5
    expected, expected_valid, _ = reference(conv, x, validity, mode)
    expected_default = reference(conv, x, None, mode)[0]
    conv.to(device)
    out, valid = partial_conv(conv, x.to(device), validity.to(device))
    assert out.device.type == valid.device.type == device.type
    torch.testing.assert_close(out.cpu(), expected)
    assert torch.equal(valid.cpu().expand_as(expected_valid), expected_valid)
    torch.testing.assert_close(conv(x.to(device)).cpu(), expected_default)


def test_conv_without_bias() -> None:
    x = torch.randn(1, 2, 5, 5)
    validity = torch.rand(1, 1, 5, 5) < 0.5
    for mode in MODES:
        conv = masked(nn.Conv2d(2, 3, 3, padding=1, bias=False), PLUS, mode)
        out, _ = partial_conv(conv, x, validity)
        torch.testing.assert_close(out, reference(conv, x, validity, mode)[0])


def test_all_zero_mask_outputs_zero() -> None:
    with pytest.warns(UserWarning, match="all zero"):
        conv = masked(nn.Conv2d(2, 3, 3, padding=1), torch.zeros(3, 3), "partial")
    out = conv(torch.randn(1, 2, 5, 5))
    assert torch.equal(out, torch.zeros(1, 3, 5, 5))


# -- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 2], ids=["single", "multi"])
def test_gradcheck(mode: str, channels: int) -> None:
    conv = masked(nn.Conv2d(2, 2, 3, padding=1, stride=(1, 2)).double(), PLUS, mode)
    validity = torch.rand(1, channels, 4, 5) < 0.6
    module = Functional(conv, validity)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = conv.parametrizations.weight.original.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        params = {"conv.parametrizations.weight.original": w, "conv.bias": b}
        out: torch.Tensor = functional_call(module, params, (x,))
        return out

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(conv, (x,))  # the drop-in forward


@pytest.mark.parametrize("mode", MODES)
def test_gradients_only_through_valid_inputs_at_active_taps(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    validity = torch.rand(2, 2, 6, 6) < 0.5
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    out, valid = partial_conv(conv, x, validity)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert x.grad is not None
    assert (x.grad[~validity] == 0).all()
    assert (x.grad[validity] != 0).any()
    grad_w = conv.parametrizations.weight.original.grad
    assert grad_w is not None
    assert (grad_w[:, :, ~PLUS] == 0).all()
    assert conv.bias.grad is not None
    torch.testing.assert_close(conv.bias.grad, (grad_out * valid).sum(dim=(0, 2, 3)))

    # Whatever the invalid inputs hold, the weight gradient is the same.
    first = grad_w.clone()
    conv.zero_grad()
    noisy = torch.where(validity, x.detach(), torch.randn_like(x) * 100)
    partial_conv(conv, noisy, validity)[0].backward(grad_out)
    assert torch.equal(conv.parametrizations.weight.original.grad, first)


@pytest.mark.parametrize("mode", MODES)
def test_stays_masked_after_training(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    opt = torch.optim.Adam(conv.parameters(), lr=0.05)
    x, y = torch.randn(4, 2, 6, 6), torch.randn(4, 3, 6, 6)
    validity = torch.rand(4, 1, 6, 6) < 0.7
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(partial_conv(conv, x, validity)[0], y).backward()
        opt.step()
    assert (conv.weight[:, :, ~PLUS] == 0).all()
    assert (conv.weight[:, :, PLUS] != 0).all()


# -- coverage -----------------------------------------------------------------------------


def test_coverage_counts_entries_with_multi_channel_validity() -> None:
    conv = masked(nn.Conv2d(3, 2, 3, padding=1), PLUS, "partial")
    validity = torch.ones(1, 3, 4, 4, dtype=torch.bool)
    validity[:, 0] = False
    cov_multi = coverage(conv, validity)
    cov_single = coverage(conv, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert cov_multi[0, 0, 1, 1] == 5 * 2  # the cross, in 2 of 3 valid channels
    assert cov_single[0, 0, 1, 1] == 5
    assert cov_single[0, 0, 0, 0] == 3
    assert cov_multi.dtype == torch.float32
    assert coverage(conv.double(), validity).dtype == torch.float64


def test_coverage_stays_exact_under_autocast() -> None:
    conv = nn.Conv2d(257, 1, 1)
    validity = torch.ones(1, 257, 2, 2, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts = coverage(conv, validity)  # 257 is not a bfloat16
        pconv = masked(nn.Conv2d(257, 1, 1), torch.ones(1, 1), "partial")
        out = pconv(torch.randn(1, 257, 2, 2))
    assert torch.equal(counts, torch.full((1, 1, 2, 2), 257.0))
    assert out.dtype == torch.bfloat16


# -- caching the all-valid maps -----------------------------------------------------------


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = partial._coverage

    def spy(*args: object, **kwargs: object) -> partial._Coverage:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(partial, "_coverage", spy)
    return calls


def test_cache_reuses_maps_and_follows_mask_shape_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counting(monkeypatch)
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(1, 2, 5, 5)
    first = conv(x)
    assert torch.equal(conv(x), first)
    assert len(calls) == 1

    set_mask(conv, TYPE_A)
    expected, _, _ = reference(conv, x, None, "partial")
    torch.testing.assert_close(conv(x), expected)
    assert len(calls) == 2

    with torch.no_grad():
        conv.parametrizations.weight[0].mask[0, 0] = False  # in place
    torch.testing.assert_close(conv(x), reference(conv, x, None, "partial")[0])

    torch.testing.assert_close(conv(x[..., :4]), reference(conv, x[..., :4], None, "partial")[0])
    conv.double()
    out = conv(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(conv, x.double(), None, "partial")[0])
    assert len(calls) == 5


def test_cache_filled_in_inference_mode_still_trains() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(1, 2, 5, 5)
    with torch.inference_mode():
        conv(x)
    conv(x).sum().backward()
    assert conv.bias.grad is not None


# -- apply / remove / set / copy / save / compile --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_roundtrip(mode: str) -> None:
    source = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    keep = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    state = source.state_dict()
    assert state.keys() == keep.state_dict().keys()  # the mode is not in the state_dict
    target = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    target.load_state_dict(state)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    x = torch.randn(1, 2, 5, 5)
    before = conv(x)
    twin = copy.deepcopy(conv)
    assert twin.__dict__[_forward.BIAS_MODE_ATTR] == mode
    assert torch.equal(twin(x), before)
    set_mask(twin, TYPE_A)
    assert torch.equal(conv(x), before)
    torch.testing.assert_close(twin(x), reference(twin, x, None, mode)[0])


@pytest.mark.parametrize("mode", MODES)
def test_torch_save_roundtrip(mode: str) -> None:
    model = nn.Sequential(masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode), nn.ReLU())
    x = torch.randn(1, 2, 5, 5)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[0].__dict__[_forward.BIAS_MODE_ATTR] == mode
    assert torch.equal(loaded(x), model(x))
    assert (loaded(x)[0, :, 0, 0] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_set_mask_changes_coverage(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    x = torch.randn(1, 2, 5, 5)
    conv(x)
    set_mask(conv, TYPE_A)
    fresh = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), fresh(x))
    validity = torch.rand(1, 1, 5, 5) < 0.5
    assert torch.equal(partial_conv(conv, x, validity)[0], partial_conv(fresh, x, validity)[0])


@pytest.mark.parametrize("mode", MODES)
def test_remove_mask_refuses_to_bake(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    cls = type(conv)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot compute.*bake=False"):
        remove_mask(conv)
    assert type(conv) is cls
    assert conv.__dict__[_forward.BIAS_MODE_ATTR] == mode
    for key, value in conv.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("mode", MODES)
def test_remove_mask_without_baking_gives_a_plain_conv(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    original = conv.parametrizations.weight.original.detach().clone()
    remove_mask(conv, bake=False)
    assert type(conv) is nn.Conv2d
    assert _forward.BIAS_MODE_ATTR not in conv.__dict__
    assert torch.equal(conv.weight, original)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(conv(x), F.conv2d(x, original, conv.bias, padding=1))


@pytest.mark.slow  # inductor compiles C++
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compile_fullgraph() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, "partial")
    twin = copy.deepcopy(conv)
    validity = torch.rand(2, 1, 6, 6) < 0.6

    def step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, valid = partial_conv(layer, x, validity)
        return (layer(x) + out).square().sum(), valid

    x = torch.randn(2, 2, 6, 6)
    loss, valid = torch.compile(step, fullgraph=True)(conv, x)
    loss.backward()
    loss_eager, valid_eager = step(twin, x)
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    assert torch.equal(valid, valid_eager)
    torch.testing.assert_close(
        conv.parametrizations.weight.original.grad, twin.parametrizations.weight.original.grad
    )


# -- PartialSequential --------------------------------------------------------------------


def net() -> PartialSequential:
    return PartialSequential(
        masked(nn.Conv2d(1, 4, 3, padding=1), PLUS, "partial"),
        nn.ReLU(),
        PartialSequential(masked(nn.Conv2d(4, 4, 3, padding=1), PLUS, "valid")),
        nn.BatchNorm2d(4),
        masked(nn.Conv2d(4, 2, 3, padding=1), torch.ones(2, 1, 3, 3), "partial"),
    )


def test_partial_sequential_chains_partial_conv() -> None:
    model = net().eval()
    x = torch.randn(2, 1, 7, 7)
    validity = torch.rand(2, 1, 7, 7) < 0.2
    out, valid = model(x, validity)
    h, v = partial_conv(model[0], x, validity)
    h, v = partial_conv(model[2][0], model[1](h), v)
    h, v = partial_conv(model[4], model[3](h), v)
    assert torch.equal(out, h)
    assert torch.equal(valid, v)
    assert valid.shape == (2, 2, 7, 7)  # the last mask is per output channel
    # Holes shrink layer by layer but never grow.
    assert (valid >= validity).all()
    default_out, default_valid = model(x)
    assert default_valid.all()
    assert torch.equal(default_out, model[4](model[3](model[2][0](model[1](model[0](x))))))


def test_partial_sequential_state_dict_is_that_of_sequential() -> None:
    model = net()
    plain = nn.Sequential(*copy.deepcopy(list(model)))
    assert model.state_dict().keys() == plain.state_dict().keys()


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_exception_apply_mask_needs_a_conv(mode: str) -> None:
    for layer in (nn.ConvTranspose2d(2, 3, 3), nn.Linear(3, 3)):
        mask = PLUS if isinstance(layer, nn.ConvTranspose2d) else torch.eye(3)
        with pytest.raises(ValueError, match="Conv1d, Conv2d and Conv3d"):
            masked(layer, mask, mode)
        assert not is_masked(layer)
        assert type(layer) in (nn.ConvTranspose2d, nn.Linear)
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="masking a layer's weight"):
        apply_mask(conv, torch.ones(3), name="bias", bias_mode=mode)  # type: ignore[arg-type]
    assert not is_masked(conv, "bias")


def test_exception_partial_conv_needs_the_bias_mode() -> None:
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="not masked"):
        partial_conv(nn.Conv2d(2, 3, 3), x)
    with pytest.raises(ValueError, match="another bias_mode"):
        partial_conv(apply_mask(nn.Conv2d(2, 3, 3), PLUS), x)
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        partial_conv("conv", x)  # type: ignore[arg-type]


def test_exception_partial_conv_input_and_validity() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, "partial")
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(ValueError, match="expects input of shape"):
        partial_conv(conv, torch.randn(5, 5))
    with pytest.raises(TypeError, match="bool tensor"):
        partial_conv(conv, x, torch.ones(2, 1, 5, 5))
    with pytest.raises(TypeError, match="bool tensor"):
        partial_conv(conv, x, [[True]])  # type: ignore[arg-type]
    bad_shapes = [(2, 3, 5, 5), (2, 1, 5, 4), (3, 1, 5, 5), (1, 5, 5), (2, 1, 1, 5, 5)]
    for shape in bad_shapes:
        with pytest.raises(ValueError, match=r"validity of shape \(N or 1, 1 or C_in=2"):
            partial_conv(conv, x, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="device of the input"):
        partial_conv(conv, x, torch.ones(2, 1, 5, 5, dtype=torch.bool, device="meta"))


def test_exception_coverage() -> None:
    validity = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="Conv1d, Conv2d or Conv3d"):
        coverage(nn.ConvTranspose2d(1, 1, 3), validity)
    with pytest.raises(ValueError, match="validity of shape"):
        coverage(nn.Conv2d(2, 1, 3), torch.ones(1, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        coverage(nn.Conv2d(1, 1, 3), validity.float())
    with pytest.raises(ValueError, match="device of the weight"):
        coverage(nn.Conv2d(1, 1, 3), validity.to("meta"))


def test_exception_partial_sequential() -> None:
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="at least one conv masked"):
        PartialSequential(nn.Conv2d(1, 1, 3), nn.ReLU())(x)
    pooled = PartialSequential(
        masked(nn.Conv2d(1, 1, 3, padding=1), PLUS, "partial"), nn.MaxPool2d(2)
    )
    with pytest.raises(ValueError, match=r"Layer 1 \(MaxPool2d\) turned"):
        pooled(x)


@pytest.mark.parametrize("bias_mode", ["valid", "partial"])
def test_jit_trace_records_the_validity_maps(bias_mode: str) -> None:
    conv = apply_mask(
        nn.Conv2d(1, 2, 3, padding=1), masks.causal(3, ndim=2, kind="A"), bias_mode=bias_mode
    )  # type: ignore[arg-type]
    x = torch.randn(1, 1, 8, 8)
    conv(x)  # eager caches the maps of this shape; the trace must not depend on that
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(conv, (x,))
    torch.testing.assert_close(traced(x), conv(x))
    torch.testing.assert_close(traced(2 * x), conv(2 * x))
