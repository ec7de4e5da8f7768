"""Every box path gives the dense convolution's outputs and gradients."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import _forward, taps
from maskparam.apply import apply_mask
from maskparam.taps import decompose, paths, plan
from tests.strategies import (
    ConvCase,
    conv_cases,
    masks_for,
    sparse_kernel_masks,
    string_padding_conv_cases,
)
from tests.tap_helpers import (
    PLUS,
    assert_same,
    ball,
    causal_type_a,
    cross3d,
    kernel_off,
    layouts,
    run,
    run_some,
    twins,
    with_layout,
)

# -- same outputs and gradients as dense ------------------------------------------------------


@given(case=conv_cases(transposed=False, dtype=torch.float64), data=st.data())
def test_taps_match_dense_every_option(case: ConvCase, data: st.DataObject) -> None:
    layer, x = case.layer, case.x
    shape = tuple(layer.weight.shape)
    mask = data.draw(
        sparse_kernel_masks(kernel_size=shape[2:])
        | masks_for(shape=shape, spatial_dims=x.dim() - 2)
    )
    x = with_layout(x, data.draw(st.sampled_from(["contiguous", "channels_last", "unbatched"])))
    dense, tapped = twins(layer, mask, "taps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an all-zero mask runs dense
        expected, got = run(dense, x), run(tapped, x)
    assert_same(expected, got, rtol=1e-10, atol=1e-10)


@given(case=conv_cases(ndims=(2, 3), transposed=False, dtype=torch.float64))
def test_dense_channels_last_path_matches_dense(case: ConvCase) -> None:
    # The path "auto" may pick besides dense and taps: dense, run in channels-last layout.
    layer, x = case.layer, case.x.requires_grad_()
    apply_mask(layer, torch.ones(layer.kernel_size, dtype=torch.bool))
    out = layer(x)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    out_cl = paths.run("dense_cl", layer, x, layer.weight, layer.bias, ())
    got = torch.autograd.grad(out_cl, [x, *layer.parameters()], grad)
    torch.testing.assert_close(out_cl, out, rtol=1e-10, atol=1e-10)
    assert out_cl.is_contiguous()
    for g_expected, g_got in zip(expected, got, strict=True):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-10)


@given(case=string_padding_conv_cases(dtype=torch.float64), data=st.data())
def test_taps_match_dense_string_padding(case: ConvCase, data: st.DataObject) -> None:
    mask = data.draw(sparse_kernel_masks(kernel_size=tuple(case.layer.weight.shape[2:])))
    dense, tapped = twins(case.layer, mask, "taps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: even "same" kernels copy input
        assert_same(run(dense, case.x), run(tapped, case.x), rtol=1e-10, atol=1e-10)


CASES_F32 = {
    "cross3d": (nn.Conv3d, cross3d(), (2, 4, 8, 9, 10), {"padding": 1}),
    "ball3d": (nn.Conv3d, ball(2), (1, 3, 7, 8, 6), {"padding": 2}),
    "causal2d": (nn.Conv2d, causal_type_a(), (2, 3, 12, 11), {"padding": 3}),
    "plus_strided": (nn.Conv2d, PLUS, (1, 4, 9, 9), {"padding": 1, "stride": 2, "groups": 2}),
    "dilated1d": (
        nn.Conv1d,
        torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1]),
        (3, 4, 40),
        {"padding": 4, "dilation": 2},
    ),
}


@pytest.mark.parametrize("name", CASES_F32)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "boxes"])
def test_taps_match_dense_float32(
    name: str, batch: int, kernel: bool, device: torch.device, box_calls: list[int]
) -> None:
    cls, mask, shape, options = CASES_F32[name]
    layer = cls(shape[1], 6, tuple(mask.shape), **options).to(device)
    dense, tapped = twins(layer, mask, "taps")
    x = torch.randn(batch, *shape[1:], device=device)
    grad = torch.randn_like(dense(x))
    with contextlib.nullcontext() if kernel else kernel_off():
        assert_same(run(dense, x, grad), run(tapped, x, grad), rtol=1e-4, atol=1e-4)
    assert box_calls == [len(decompose(mask.bool()))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_taps_match_dense_half_precision(dtype: torch.dtype, box_calls: list[int]) -> None:
    layer = nn.Conv3d(4, 6, 3, padding=1).to(dtype)
    dense, tapped = twins(layer, cross3d(), "taps")
    x = torch.randn(2, 4, 6, 6, 6, dtype=dtype)
    assert_same(run(dense, x), run(tapped, x), rtol=2e-2, atol=5e-2)
    assert box_calls == [3]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_keeps_the_dense_layout(layout: str) -> None:
    _, tapped = twins(nn.Conv3d(4, 6, 3, padding=1), cross3d(), "taps")
    x = with_layout(torch.randn(2, 4, 5, 6, 7), layout).requires_grad_()
    out = tapped(x)
    out.backward(torch.ones_like(out))
    if layout == "contiguous":
        assert out.is_contiguous()
        assert x.grad.is_contiguous()
        assert out.view(2, -1).shape == (2, 6 * 5 * 6 * 7)  # views work, as on dense output
    else:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_gradcheck_and_gradgradcheck() -> None:
    # Type A 3x3: both boxes read an explicitly padded window; stride and dilation differ.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    layer = nn.Conv2d(1, 2, 3, padding=2, stride=(1, 2), dilation=(2, 1)).double()
    apply_mask(layer, mask, execution="taps")
    boxes = layer.__dict__[_forward.EXECUTION_ATTR].boxes
    assert len(boxes) == 2

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return taps.run_boxes(layer, x, torch.where(mask, w, 0), b, boxes)

    x = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    x_cl = torch.randn(2, 1, 5, 6, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    assert torch.autograd.gradgradcheck(fn, (x_cl.requires_grad_(), w, b))


def test_stays_masked_and_matches_dense_through_training() -> None:
    layer = nn.Conv3d(2, 3, 3, padding=1).double()
    dense, tapped = twins(layer, cross3d(), "taps")
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (dense, tapped)]
    x = torch.randn(2, 2, 5, 5, 5, dtype=torch.float64)
    target = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64)
    for _ in range(5):
        for model, opt in zip((dense, tapped), opts, strict=False):
            opt.zero_grad()
            ((model(x) - target) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(tapped.weight, dense.weight, rtol=1e-9, atol=1e-9)
    assert (tapped.weight[:, :, ~cross3d()] == 0).all()


# -- the fused CPU path -----------------------------------------------------------------------


@given(
    case=conv_cases(transposed=False, dtype=torch.float32)
    | string_padding_conv_cases(dtype=torch.float32),
    data=st.data(),
)
def test_fused_path_matches_dense_in_float32(case: ConvCase, data: st.DataObject) -> None:
    # float32 on the CPU adds each box into the sum inside the conv library, and takes the
    # input gradients from transposed convolutions: every option, any set of gradients.
    # Where the compiled kernel applies it runs instead, unless switched off here.
    layer, x = case.layer, case.x
    kernel = data.draw(st.booleans(), label="kernel")
    shape = tuple(layer.weight.shape)
    mask = data.draw(
        sparse_kernel_masks(kernel_size=shape[2:])
        | masks_for(shape=shape, spatial_dims=x.dim() - 2)
    )
    x = with_layout(x, data.draw(st.sampled_from(["contiguous", "channels_last", "unbatched"])))
    wanted = data.draw(st.sets(st.sampled_from(["input", "weight", "bias"])))
    dense, tapped = twins(layer, mask, "taps")
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore", UserWarning)  # an all-zero mask runs dense
        if not kernel:
            stack.enter_context(kernel_off())
        expected, got = run_some(dense, x, wanted), run_some(tapped, x, wanted)
    assert_same(expected, got, rtol=1e-4, atol=1e-4)
    for key in ("out", "input"):
        # The layout dense gives a tensor with a size-1 dim depends on the conv backend.
        if got.get(key) is not None and min(got[key].shape) > 1:
            assert layouts(got[key]) == layouts(expected[key])


def test_3d_boxes_run_as_2d_convolutions_of_views() -> None:
    # The ball's center cube stays 3-D; its pairs along the depth run over (D, H * W) and
    # those in the plane over the N * D planes, both free views of channels-last input.
    layer = nn.Conv3d(2, 3, 5, padding=2)
    apply_mask(layer, ball(2), execution="taps")
    boxes = layer.__dict__[_forward.EXECUTION_ATTR].boxes
    planned = plan.box_plan(
        boxes, plan.Geometry.of(layer, lift=False), (6, 7, 8), (5, 5, 5), False
    )
    assert [step.fold and step.fold.kind for step in planned.steps] == [
        None,
        "plane",
        "depth",
        "depth",
    ]
    assert planned.steps[1].fold.dilation == (4, 1)


def test_gradcheck_and_gradgradcheck_3d_folds() -> None:
    layer = nn.Conv3d(2, 2, 5, padding=2).double()
    apply_mask(layer, ball(2), execution="taps")
    boxes = layer.__dict__[_forward.EXECUTION_ATTR].boxes

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return taps.run_boxes(layer, x, torch.where(ball(2), w, 0), b, boxes)

    x = torch.randn(2, 2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_taps_that_only_meet_the_padding(dtype: torch.dtype) -> None:
    # One plane deep: the ball's taps two planes away read nothing but zero padding.
    dense, tapped = twins(nn.Conv3d(3, 4, 5, padding=2).to(dtype), ball(2), "taps")
    x = torch.randn(2, 3, 1, 6, 5, dtype=dtype)
    expected, got = run(dense, x), run(tapped, x)
    assert_same(expected, got, rtol=1e-5, atol=1e-5)
    assert (got["weight"][:, :, [0, 4]] == 0).all()


def test_backward_twice_with_retain_graph() -> None:
    # The second backward must find its saved tensors intact, although other calls have
    # taken the scratch buffers in between.
    dense, tapped = twins(nn.Conv3d(4, 6, 3, padding=1), cross3d(), "taps")
    x = torch.randn(2, 4, 6, 5, 7, requires_grad=True)
    out = tapped(x)
    grad = torch.randn_like(out)
    weight = tapped.parametrizations.weight.original
    first = torch.autograd.grad(out, [x, weight], grad, retain_graph=True)
    tapped(torch.randn(2, 4, 6, 5, 7, requires_grad=True)).sum().backward()
    second = torch.autograd.grad(out, [x, weight], grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    expected = torch.autograd.grad(dense(x), [x, dense.parametrizations.weight.original], grad)
    for a, b in zip(expected, first, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_inference_mode_then_training() -> None:
    # Scratch buffers made under inference mode are plain tensors, written in place later.
    dense, tapped = twins(nn.Conv3d(4, 6, 3, padding=1), cross3d(), "taps")
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(tapped(x), dense(x))
    assert_same(run(dense, x), run(tapped, x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, inside torch
def test_forward_mode_ad_matches_dense() -> None:
    dense, tapped = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "taps")
    x, tangent = torch.randn(2, 2, 5, 5, 5), torch.randn(2, 2, 5, 5, 5)
    with fwAD.dual_level():
        expected, got = (fwAD.unpack_dual(m(fwAD.make_dual(x, tangent))) for m in (dense, tapped))
    torch.testing.assert_close(got.primal, expected.primal)
    torch.testing.assert_close(got.tangent, expected.tangent)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_without_the_conv_library() -> None:
    dense, tapped = twins(nn.Conv3d(4, 6, 3, padding=1), cross3d(), "taps")
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.backends.mkldnn.flags(enabled=False):
        assert_same(run(dense, x), run(tapped, x), rtol=1e-5, atol=1e-5)


# -- CUDA -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_taps_match_dense_cuda(layout: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    layer = nn.Conv3d(4, 6, 5, padding=2).cuda()
    dense, tapped = twins(layer, ball(2), "taps")
    x = with_layout(torch.randn(2, 4, 8, 8, 8, device="cuda"), layout)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-4, atol=1e-4)
    auto = apply_mask(nn.Conv3d(4, 6, 5, padding=2).cuda(), ball(2), execution="auto")
    auto.load_state_dict(dense.state_dict())
    assert_same(run(dense, x), run(auto, x), rtol=1e-4, atol=1e-4)
