from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _forward, taps
from maskparam.apply import apply_mask, remove_mask, set_mask
from maskparam.taps import Box, TapExecution, decompose, memory, paths, plan, spatial_support
from maskparam.taps import auto as auto_module
from maskparam.taps import boxes as boxes_module
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.memory import Scratch
from tests.strategies import (
    ConvCase,
    bool_masks,
    conv_cases,
    masks_for,
    sparse_kernel_masks,
    string_padding_conv_cases,
)

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
FALLBACK = "falls back to the dense convolution"


def cross3d() -> torch.Tensor:
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[1, 1, :] = mask[1, :, 1] = mask[:, 1, 1] = True
    return mask


def ball(radius: int, ndim: int = 3) -> torch.Tensor:
    axis = torch.arange(-radius, radius + 1)
    grids = torch.meshgrid(*[axis] * ndim, indexing="ij")
    return sum(g**2 for g in grids) <= radius**2


def causal_type_a(k: int = 7) -> torch.Tensor:
    mask = torch.zeros(k, k, dtype=torch.bool)
    mask[: k // 2] = True
    mask[k // 2, : k // 2] = True
    return mask


def covered(boxes: tuple[Box, ...]) -> list[tuple[int, ...]]:
    return [tap for box in boxes for tap in box.taps()]


@contextlib.contextmanager
def kernel_off() -> Iterator[None]:
    """Run as on a machine where the compiled kernel is unavailable: the boxes only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASKPARAM_TAP_KERNEL", "0")
        tap_kernel.clear()
        try:
            yield
        finally:
            patch.undo()
            tap_kernel.clear()


def twins(layer: nn.Module, mask: torch.Tensor, execution: str) -> tuple[nn.Module, nn.Module]:
    """(dense, other): the same layer masked twice, the second with ``execution``."""
    dense = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-zero masks are allowed
        apply_mask(dense, mask)
        apply_mask(layer, mask, execution=execution)
    return dense, layer


def run(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Output and gradients of input, stored weight and bias after one backward."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(torch.ones_like(out) if grad is None else grad)
    result = {"out": out.detach(), "input": x.grad}
    result["weight"] = layer.parametrizations.weight.original.grad
    if layer.bias is not None:
        result["bias"] = layer.bias.grad
    return result


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "unbatched":
        return x[0]
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x


# -- 1. decomposition ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "sizes"),
    [
        (cross3d(), [3, 2, 2]),
        (ball(2), [27, 2, 2, 2]),
        (causal_type_a(), [21, 3]),
        (PLUS, [3, 2]),
        (torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1]), [3]),
        (torch.ones(3, 3, 3), [27]),
    ],
    ids=["cross3d", "ball2", "causal7", "plus", "dilated1d", "full"],
)
def test_decompose_shaped_kernels(mask: torch.Tensor, sizes: list[int]) -> None:
    boxes = decompose(mask.bool())
    assert boxes is not None
    assert [b.size for b in boxes] == sizes
    assert sorted(covered(boxes)) == sorted(map(tuple, mask.nonzero().tolist()))


def test_decompose_cross_is_three_lines() -> None:
    boxes = decompose(cross3d())
    assert boxes == (
        Box(start=(0, 1, 1), count=(3, 1, 1), step=(1, 1, 1)),
        Box(start=(1, 0, 1), count=(1, 2, 1), step=(1, 2, 1)),
        Box(start=(1, 1, 0), count=(1, 1, 2), step=(1, 1, 2)),
    )


@given(mask=bool_masks(max_dims=3, max_side=5))
def test_decompose_is_exact_and_disjoint(mask: torch.Tensor) -> None:
    boxes = decompose(mask, max_boxes=200)
    assert boxes is not None
    taps_ = covered(boxes)
    assert len(taps_) == len(set(taps_)), "boxes overlap"
    assert set(taps_) == {tuple(t) for t in mask.nonzero().tolist()}
    assert [b.size for b in boxes] == sorted((b.size for b in boxes), reverse=True)
    for box in boxes:
        assert all(s >= 1 and c >= 1 for s, c in zip(box.step, box.count, strict=False))
        assert all(
            a >= 0 and a + (c - 1) * q < k
            for a, c, q, k in zip(box.start, box.count, box.step, mask.shape, strict=False)
        )


def test_decompose_empty_and_too_many() -> None:
    assert decompose(torch.zeros(3, 3, dtype=torch.bool)) == ()
    checker = (torch.arange(9).reshape(3, 3) % 2 == 0) & ~PLUS  # the 4 corners
    assert len(decompose(checker)) == 1  # one box with step 2 on both axes
    assert decompose(torch.tensor([1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool), max_boxes=1) is None


def test_decompose_gives_up_on_irregular_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boxes_module, "_SEARCH_BUDGET", 50)
    mask = torch.rand(5, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    assert decompose(mask) is None


def test_spatial_support_is_union_over_channels() -> None:
    mask = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    mask[0, 1, 0, 0] = True
    mask[1, 2, 2, 1] = True
    support = spatial_support(mask, (2, 3, 3, 3))
    assert support.device.type == "cpu"
    assert support.nonzero().tolist() == [[0, 0], [2, 1]]
    assert spatial_support(torch.ones(2, 1, 1, 1, dtype=torch.bool), (2, 3, 3, 3)).all()


# -- 2. same outputs and gradients as dense ---------------------------------------------------


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


# -- 2b. the fused CPU path ------------------------------------------------------------------


def run_some(layer: nn.Module, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Output, and the gradients in ``wanted`` (input, weight, bias) with the rest frozen."""
    x = x.detach().clone().requires_grad_("input" in wanted)
    weight = layer.parametrizations.weight.original
    weight.requires_grad_("weight" in wanted)
    if layer.bias is not None:
        layer.bias.requires_grad_("bias" in wanted)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    result = {"out": out.detach()}
    if out.requires_grad:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        out.backward(grad)
        result |= {"input": x.grad, "weight": weight.grad}
        if layer.bias is not None:
            result["bias"] = layer.bias.grad
    return result


def layouts(t: torch.Tensor) -> tuple[bool, bool]:
    """Whether ``t`` is contiguous, and whether it is channels-last."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t.is_contiguous(), fmt is not None and t.is_contiguous(memory_format=fmt)


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


def test_empty_cache_frees_the_kept_buffers() -> None:
    _, tapped = twins(nn.Conv3d(16, 16, 3, padding=1), cross3d(), "taps")
    tapped(torch.randn(1, 16, 6, 6, 6)).sum().backward()  # contiguous: takes scratch buffers
    assert memory.SCRATCH._free
    taps.empty_cache()
    assert not memory.SCRATCH._free


def test_scratch_buffers_are_never_shared_and_kept_bounded() -> None:
    scratch = Scratch(keep=2)
    a = scratch.take((2, 3, 4, 5), torch.float32, channels_last=True)
    b = scratch.take((2, 3, 4, 5), torch.float32, channels_last=True)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert a.shape == (2, 3, 4, 5)
    assert a.data_ptr() != b.data_ptr()
    scratch.give(a, None, b)
    c = scratch.take((7, 11), torch.float32, channels_last=False)  # fits in either
    assert c.is_contiguous()
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr())
    assert scratch.take((7, 11), torch.float64, channels_last=False).data_ptr() not in (
        a.data_ptr(),
        b.data_ptr(),
    )
    big = scratch.take((1000,), torch.float32, channels_last=False)
    scratch.give(c, big)  # three buffers: the smallest goes
    kept = {scratch.take((120,), torch.float32, channels_last=False).data_ptr() for _ in "ab"}
    assert big.data_ptr() in kept
    scratch.clear()
    assert scratch.take((120,), torch.float32, channels_last=False).data_ptr() not in kept


# -- 3. the recorded choice composes with the rest --------------------------------------------


def test_smoke() -> None:
    conv = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="taps")
    execution = conv.__dict__[_forward.EXECUTION_ATTR]
    assert isinstance(execution, TapExecution)
    assert [b.size for b in execution.boxes] == [3, 2, 2]
    assert repr(execution) == "TapExecution(mode='taps', active=7/27, boxes=3)"
    assert "_conv_forward" in type(conv).__dict__
    assert conv(torch.randn(1, 2, 4, 4, 4)).shape == (1, 3, 4, 4, 4)


def test_dense_records_nothing() -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS, execution="dense")
    assert _forward.EXECUTION_ATTR not in conv.__dict__
    assert "_conv_forward" not in type(conv).__dict__


def test_state_dict_roundtrip() -> None:
    dense, tapped = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "taps")
    assert tapped.state_dict().keys() == dense.state_dict().keys()
    fresh = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="taps")
    fresh.load_state_dict(dense.state_dict())
    x = torch.randn(1, 2, 4, 5, 6)
    torch.testing.assert_close(fresh(x), dense(x))


def test_load_state_dict_with_another_mask_replans() -> None:
    source = apply_mask(nn.Conv2d(2, 3, 7, padding=3), causal_type_a())
    target = apply_mask(nn.Conv2d(2, 3, 7, padding=3), torch.ones(7, 7), execution="taps")
    x = torch.randn(1, 2, 9, 9)
    target(x)  # plans the full kernel, and checks the mask tensor
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x))
    assert [b.size for b in target.__dict__[_forward.EXECUTION_ATTR].boxes] == [21, 3]


def test_in_place_mask_edit_replans() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS, execution="taps")
    x = torch.randn(1, 2, 6, 6)
    conv(x)
    with torch.no_grad():
        conv.parametrizations.weight[0].mask[0, 0] = True
    reference = apply_mask(copy.deepcopy(remove_mask(copy.deepcopy(conv), bake=False)), PLUS)
    set_mask(reference, conv.parametrizations.weight[0].mask)
    torch.testing.assert_close(conv(x), reference(x))
    assert sum(b.size for b in conv.__dict__[_forward.EXECUTION_ATTR].boxes) == 6


def test_set_mask_replans() -> None:
    dense, tapped = twins(nn.Conv2d(2, 3, 7, padding=3), PLUS.new_ones(7, 7), "taps")
    set_mask(tapped, causal_type_a())
    set_mask(dense, causal_type_a())
    execution = tapped.__dict__[_forward.EXECUTION_ATTR]
    assert [b.size for b in execution.boxes] == [21, 3]
    x = torch.randn(2, 2, 8, 8)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-5, atol=1e-5)


def test_set_mask_to_a_fragmented_mask_warns_where_the_kernel_cannot_take_it() -> None:
    # float64: the tap kernel, which can run any set of taps, takes float32 only.
    conv = apply_mask(nn.Conv3d(1, 1, 7).double(), torch.ones(7, 7, 7), execution="taps")
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    with pytest.warns(UserWarning, match=f"more than {taps.MAX_BOXES} boxes"):
        set_mask(conv, mask)
    assert conv.__dict__[_forward.EXECUTION_ATTR].boxes is None


def test_deepcopy() -> None:
    conv = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="auto")
    x = torch.randn(1, 2, 4, 4, 4)
    conv(x)
    twin = copy.deepcopy(conv)
    assert twin.__dict__[_forward.EXECUTION_ATTR] is not conv.__dict__[_forward.EXECUTION_ATTR]
    assert twin.__dict__[_forward.EXECUTION_ATTR].mode == "auto"
    torch.testing.assert_close(twin(x), conv(x))
    remove_mask(twin)
    assert "_conv_forward" in type(conv).__dict__
    torch.testing.assert_close(conv(x), twin(x))


def test_torch_save_keeps_execution() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 7, padding=3), causal_type_a(), execution="taps")
    x = torch.randn(1, 2, 8, 8)
    conv(x)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert (
        loaded.__dict__[_forward.EXECUTION_ATTR].boxes
        == conv.__dict__[_forward.EXECUTION_ATTR].boxes
    )
    torch.testing.assert_close(loaded(x), conv(x))


@pytest.mark.parametrize("bake", [True, False])
def test_remove_mask_gives_a_plain_dense_layer(bake: bool) -> None:
    dense, tapped = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "taps")
    x = torch.randn(1, 2, 4, 4, 4)
    expected = dense(x)
    remove_mask(tapped, bake=bake)
    assert type(tapped) is nn.Conv3d
    assert _forward.EXECUTION_ATTR not in tapped.__dict__
    assert not tapped._load_state_dict_post_hooks
    if bake:
        torch.testing.assert_close(tapped(x), expected)


def test_torch_compile_fullgraph() -> None:
    _, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    x = torch.randn(2, 2, 6, 6)
    eager = run(tapped, x)
    compiled = torch.compile(tapped, fullgraph=True, backend="aot_eager")
    assert_same(eager, run(compiled, x), rtol=1e-5, atol=1e-5)


def test_torch_compile_sees_a_new_mask_from_set_mask_or_load_state_dict() -> None:
    dense, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    compiled = torch.compile(tapped, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(compiled(x), dense(x))
    corners = ~PLUS
    for layer in (dense, tapped):
        set_mask(layer, corners)
    torch.testing.assert_close(compiled(x), dense(x))
    source = apply_mask(nn.Conv2d(2, 3, 3, padding=1), torch.ones(3, 3))
    for layer in (dense, tapped):
        layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(compiled(x), dense(x))


# -- 4. "auto" -----------------------------------------------------------------------------


@pytest.fixture
def fake_timer(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, float]], list[object]]:
    """Replace the timing with fixed seconds per path; returns the list of calls made."""
    monkeypatch.setattr(auto_module, "_DECISIONS", {})

    def install(seconds: dict[str, float]) -> list[object]:
        calls: list[object] = []

        def measure(candidates: list[str], *args: object) -> dict[str, float]:
            calls.append((tuple(candidates), args[-1]))
            return {c: seconds[c] for c in candidates}

        monkeypatch.setattr(auto_module, "measure", measure)
        return calls

    return install


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ({"dense": 1.0, "dense_cl": 0.95, "taps": 0.5}, "taps"),
        ({"dense": 1.0, "dense_cl": 0.5, "taps": 0.6}, "dense_cl"),
        ({"dense": 1.0, "dense_cl": 0.95, "taps": 0.92}, "dense"),  # within the margin
        ({"dense": 1.0, "dense_cl": 2.0, "taps": 3.0}, "dense"),
    ],
)
def test_auto_picks_the_fastest_only_when_clearly_faster(
    fake_timer: Callable[[dict[str, float]], list[object]],
    seconds: dict[str, float],
    expected: str,
) -> None:
    calls = fake_timer(seconds)
    dense, auto = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "auto")
    x = torch.randn(1, 2, 4, 4, 4)
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)
    assert list(auto_module._DECISIONS.values()) == [expected]
    assert calls == [(("dense", "dense_cl", "taps"), True)]


def test_auto_measures_once_per_shape_and_grad_mode(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    calls = fake_timer({"dense": 1.0, "dense_cl": 1.0, "taps": 0.1})
    layers = [apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="auto") for _ in "ab"]
    x = torch.randn(1, 2, 4, 4, 4)
    for layer in layers:  # identical layers share the measurement
        layer(x)
        layer(x)
    layers[0](torch.randn(2, 2, 4, 4, 4))
    with torch.no_grad():
        layers[0](x)
    assert calls == [
        (("dense", "dense_cl", "taps"), True),
        (("dense", "dense_cl", "taps"), True),
        (("dense", "dense_cl", "taps"), False),
    ]


def test_auto_skips_taps_for_dense_masks(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    calls = fake_timer({"dense": 1.0, "dense_cl": 1.0})
    conv = apply_mask(nn.Conv1d(2, 3, 5), torch.tensor([1, 1, 1, 1, 0]), execution="auto")
    conv(torch.randn(1, 2, 9))
    assert calls == []  # 1-D has no channels-last layout, and 4/5 taps are too many
    assert list(auto_module._DECISIONS.values()) == ["dense"]


def test_auto_real_measurement_leaves_gradients_alone() -> None:
    dense, auto = twins(nn.Conv2d(2, 3, 7, padding=3), causal_type_a(), "auto")
    x = torch.randn(2, 2, 8, 8)
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)  # first call measures
    assert auto.__dict__[_forward.EXECUTION_ATTR]._choices
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)


def test_auto_under_compile_uses_eager_choice(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    fake_timer({"dense": 1.0, "dense_cl": 1.0, "taps": 0.1})
    dense, auto = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "auto")
    x = torch.randn(2, 2, 6, 6)
    run(auto, x)
    compiled = torch.compile(auto, fullgraph=True, backend="aot_eager")
    assert_same(run(dense, x), run(compiled, x), rtol=1e-5, atol=1e-5)


# -- 5. fallbacks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", [nn.Linear(3, 3), nn.ConvTranspose2d(2, 2, 3)], ids=["Linear", "ConvTranspose2d"]
)
def test_forced_taps_on_unsupported_module_warns_and_runs_dense(module: nn.Module) -> None:
    mask = torch.ones(module.weight.shape, dtype=torch.bool)
    with pytest.warns(UserWarning, match=f"{FALLBACK} for this {type(module).__name__}"):
        apply_mask(module, mask, execution="taps")
    assert _forward.EXECUTION_ATTR not in module.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_mask(copy.deepcopy(remove_mask(module)), mask, execution="auto")  # silent


def test_forced_taps_with_data_dependent_bias_warns() -> None:
    with pytest.warns(UserWarning, match="bias_mode='valid' runs its own convolutions"):
        conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS, bias_mode="valid", execution="taps")
    assert _forward.EXECUTION_ATTR not in conv.__dict__


def test_forced_taps_on_fragmented_mask_warns_and_matches_dense() -> None:
    # As on a machine without the tap kernel, the only path that runs any set of taps.
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    layer = nn.Conv3d(1, 2, 7, padding=3)
    dense = apply_mask(copy.deepcopy(layer), mask)
    with kernel_off():
        with pytest.warns(UserWarning, match=f"more than {taps.MAX_BOXES} boxes"):
            tapped = apply_mask(layer, mask, execution="taps")
        x = torch.randn(1, 1, 8, 8, 8)
        with pytest.warns(UserWarning, match=FALLBACK):
            assert_same(run(dense, x), run(tapped, x))


def test_forced_taps_on_empty_mask_warns() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        conv = apply_mask(nn.Conv2d(1, 2, 3), torch.zeros(3, 3), execution="taps")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "all zero" in messages[0]
    assert "no active tap" in messages[1]
    with pytest.warns(UserWarning, match="no active tap"):
        out = conv(torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(out, conv.bias.detach().view(1, 2, 1, 1).expand(1, 2, 2, 2))


def test_forced_taps_after_another_parametrization_warns() -> None:
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w + 1  # makes masked taps non-zero

    dense, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    for layer in (dense, tapped):
        parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match="another parametrization comes after the mask"):
        out = tapped(x)
    torch.testing.assert_close(out, dense(x))


def test_forced_taps_on_unsupported_device_or_dtype_warns() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3).to("meta"), PLUS, execution="taps")
    with pytest.warns(UserWarning, match="runs on CPU and CUDA, not meta"):
        assert conv(torch.empty(1, 2, 5, 5, device="meta")).shape == (1, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: complex modules are new
        layer = nn.Conv2d(2, 3, 3).to(torch.complex64)
    dense, tapped = twins(layer, PLUS, "taps")
    x = torch.randn(1, 2, 5, 5, dtype=torch.complex64)
    with pytest.warns(UserWarning, match="needs floating-point input"):
        torch.testing.assert_close(tapped(x), dense(x))


def test_forced_taps_under_vmap_warns_and_matches_dense() -> None:
    dense, tapped = twins(nn.Conv2d(3, 4, 3, padding=1), PLUS, "taps")
    x = torch.randn(5, 2, 3, 6, 6)
    with pytest.warns(UserWarning, match="torch.func transforms"):
        out = torch.func.vmap(tapped)(x)
    torch.testing.assert_close(out, torch.func.vmap(dense)(x))


def test_auto_falls_back_silently() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3).to("meta"), PLUS, execution="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv(torch.empty(1, 2, 5, 5, device="meta"))


# -- 6. errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["fast", "TAPS", None, 1])
def test_exception_unknown_execution(execution: object) -> None:
    conv = nn.Conv2d(1, 1, 3)
    before = copy.deepcopy(conv.state_dict())
    with pytest.raises(ValueError, match="execution to be one of"):
        apply_mask(conv, PLUS, execution=execution)  # type: ignore[arg-type]
    assert type(conv) is nn.Conv2d
    assert not parametrize.is_parametrized(conv)
    assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())


def test_exception_execution_on_other_names() -> None:
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match="needs name='weight'"):
        apply_mask(conv, torch.tensor([1, 0]), name="bias", execution="taps")
    assert not parametrize.is_parametrized(conv)


# -- 7. CUDA ---------------------------------------------------------------------------------


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
