"""bias_mode='valid'/'partial' and partial_conv: outputs, agreement with a reference, gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from maskparam import _forward
from maskparam.partial import coverage, partial_conv
from tests.partial_helpers import (
    BOX,
    CONV,
    MODES,
    PLUS,
    TYPE_A,
    Functional,
    masked,
    masked_conv,
    reference,
)
from tests.strategies import conv_cases, masks_for, validities

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
