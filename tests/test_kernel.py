"""The compiled active-tap kernel: it matches dense, and the boxes take over where it can't."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import _forward, taps
from maskparam.apply import apply_mask
from maskparam.taps import build
from maskparam.taps import kernel as tap_kernel
from tests.strategies import sparse_kernel_masks
from tests.tap_helpers import (
    PLUS,
    assert_same,
    ball,
    causal_type_a,
    cross3d,
    kernel_off,
    needs_kernel,
    run,
    run_some,
    twins,
)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the input shape of every call of the kernel's forward."""
    calls: list[tuple[int, ...]] = []
    real = tap_kernel.TapKernel.apply

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(tap_kernel.TapKernel, "apply", counted)
    return calls


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine without a C compiler: the kernel is unavailable."""
    monkeypatch.setenv("MASKPARAM_TAP_KERNEL", "0")
    tap_kernel.clear()
    yield
    monkeypatch.undo()
    tap_kernel.clear()


@st.composite
def kernel_cases(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A stride-1 conv whose output planes keep their size, a sparse mask, an input."""
    ndim = draw(st.sampled_from([1, 2, 3]))
    kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    # "same" along the last two axes; any zero padding along the depth of a 3-D conv
    padding = [d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True)]
    if ndim == 3:
        padding[0] = draw(st.integers(0, padding[0] + 1))
    c_in = draw(st.sampled_from([1, 3, 8, 13, 16]))
    c_out = draw(st.sampled_from([1, 5, 8, 16, 24, 32, 48, 80]))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    layer = conv(
        c_in, c_out, kernel, padding=tuple(padding), dilation=dilation, bias=draw(st.booleans())
    )
    sizes = [draw(st.integers(1, 9)) for _ in range(ndim)]
    if ndim == 3:  # enough depth for an output
        sizes[0] = max(sizes[0], dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    x = torch.randn(draw(st.integers(1, 3)), c_in, *sizes)
    mask = draw(sparse_kernel_masks(kernel_size=kernel))
    return layer, mask, x


def check_kernel_matches_dense(
    case: tuple[nn.Module, torch.Tensor, torch.Tensor], data: st.DataObject
) -> None:
    layer, mask, x = case
    wanted = data.draw(st.sets(st.sampled_from(["input", "weight", "bias"])))
    dense, tapped = twins(layer, mask, "taps")
    calls: list[int] = []
    real = tap_kernel.TapKernel.apply

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    tap_kernel.TapKernel.apply = counted  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an all-zero mask runs dense
            expected, got = run_some(dense, x, wanted), run_some(tapped, x, wanted)
    finally:
        tap_kernel.TapKernel.apply = real  # type: ignore[method-assign]
    assert_same(expected, got, rtol=1e-4, atol=1e-4)
    assert len(calls) == (1 if mask.any() else 0)


@needs_kernel
@given(case=kernel_cases(), data=st.data())
def test_kernel_matches_dense(
    case: tuple[nn.Module, torch.Tensor, torch.Tensor], data: st.DataObject
) -> None:
    check_kernel_matches_dense(case, data)


@needs_kernel
@pytest.mark.parametrize(
    ("cls", "mask", "shape", "c_out", "options"),
    [
        (nn.Conv3d, cross3d(), (2, 16, 9, 10, 11), 32, {"padding": 1}),
        (nn.Conv3d, ball(2), (1, 8, 6, 7, 8), 64, {"padding": 2}),
        (nn.Conv2d, causal_type_a(), (2, 3, 13, 17), 64, {"padding": 3}),
        # output channels in the lanes, a plane in rectangles of whole rows
        (nn.Conv2d, causal_type_a(5), (1, 4, 70, 40), 64, {"padding": 2}),
        # a row longer than a rectangle holds: rectangles of part of a row
        (nn.Conv1d, torch.tensor([1, 0, 1, 0, 1]), (2, 3, 3000), 32, {"padding": 2}),
        (nn.Conv1d, torch.tensor([1, 0, 1, 0, 1]), (2, 3, 3000), 12, {"padding": 2}),
        # more than 64 output channels, and a count that is no multiple of 16
        (nn.Conv3d, cross3d(), (1, 5, 4, 5, 6), 80, {"padding": 1}),
        (nn.Conv3d, cross3d(), (1, 5, 4, 5, 6), 40, {"padding": 1, "bias": False}),
        # an output and an input gradient of 4 and 2 MB, which the kernel writes with
        # streaming stores on AVX-512 (from 1 MB per thread: two threads on the CI machine)
        (nn.Conv3d, cross3d(), (1, 16, 8, 64, 64), 32, {"padding": 1}),
    ],
)
def test_kernel_matches_dense_on_shaped_kernels(
    cls: type[nn.Module],
    mask: torch.Tensor,
    shape: tuple[int, ...],
    c_out: int,
    options: dict[str, object],
    kernel_calls: list[tuple[int, ...]],
) -> None:
    check_shaped_kernel(cls, mask, shape, c_out, options)
    assert len(kernel_calls) == 1


def check_shaped_kernel(
    cls: type[nn.Module],
    mask: torch.Tensor,
    shape: tuple[int, ...],
    c_out: int,
    options: dict[str, object],
) -> None:
    layer = cls(shape[1], c_out, tuple(mask.shape), **options)
    dense, tapped = twins(layer, mask, "taps")
    x = torch.randn(shape)
    grad = torch.randn_like(dense(x))
    assert_same(run(dense, x, grad), run(tapped, x, grad), rtol=1e-4, atol=1e-4)


# -- the AVX2 build, on a CPU that also runs it ---------------------------------------------------


@pytest.fixture(scope="class")
def avx2_kernel() -> Iterator[None]:
    """The kernel built for AVX2 (with FMA), for the tests of one class; then the usual one."""
    if not {"avx2", "fma"} <= build.cpu_flags():
        pytest.skip("this CPU has no AVX2 with FMA")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASKPARAM_TAP_ISA", "avx2")
        tap_kernel.clear()
        try:
            if tap_kernel.isa() != "avx2":
                pytest.skip(f"no AVX2 tap kernel here: {tap_kernel.status()}")
            yield
        finally:
            patch.undo()
            tap_kernel.clear()


@pytest.mark.usefixtures("avx2_kernel")
class TestAVX2:
    """The AVX2 build: other lanes and tiles, masked loads of their own, the same results."""

    def test_smoke(self) -> None:
        assert tap_kernel.status() == "ready (avx2)"
        assert tap_kernel.sizes()["lanes"] == 8
        # it never streams its stores: nothing to tune there
        assert "stream n/a" in tap_kernel.kernel_status()

    @given(case=kernel_cases(), data=st.data())
    def test_kernel_matches_dense(
        self, case: tuple[nn.Module, torch.Tensor, torch.Tensor], data: st.DataObject
    ) -> None:
        check_kernel_matches_dense(case, data)

    @pytest.mark.parametrize(
        ("c_in", "c_out"), [(5, 8), (12, 8), (16, 8), (3, 16), (16, 32), (5, 40), (2, 80)]
    )
    def test_both_weight_gradients_match_dense(self, c_in: int, c_out: int) -> None:
        variant = tap_kernel.weight_grad_variant(c_in, c_out, 7)
        by_channels = c_out % 8 == 0 and (c_out >= 16 or c_in >= 16)
        assert variant == ("channels" if by_channels else "positions")
        check_shaped_kernel(nn.Conv3d, cross3d(), (2, c_in, 5, 9, 11), c_out, {"padding": 1})

    @pytest.mark.parametrize(("c_in", "c_out"), [(5, 8), (16, 3), (16, 32), (3, 40)])
    def test_channels_last_matches_dense(self, c_in: int, c_out: int) -> None:
        layer = nn.Conv3d(c_in, c_out, 3, padding=1)
        dense, tapped = twins(layer, cross3d(), "taps")
        x = torch.randn(2, c_in, 5, 9, 11).contiguous(memory_format=torch.channels_last_3d)
        grad = torch.randn_like(dense(x))
        assert_same(run(dense, x, grad), run(tapped, x, grad), rtol=1e-4, atol=1e-4)
        assert taps.explain(tapped, x).path == "kernel"


@needs_kernel
@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # float32 on purpose
def test_kernel_gradcheck_in_float32() -> None:
    # The conv is linear in each input, so central differences are exact up to rounding.
    layer = nn.Conv3d(3, 4, 3, padding=1)
    apply_mask(layer, cross3d(), execution="taps")
    boxes = layer.__dict__[_forward.EXECUTION_ATTR].boxes

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return taps.run_boxes(layer, x, torch.where(cross3d(), w, 0), b, boxes)

    x = torch.randn(2, 3, 3, 4, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    assert fn(x, w, b).grad_fn.name() == "TapKernelBackward"
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=0.25, atol=2e-3, rtol=2e-3)


def double_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradient of ``sum(model(x)**2)``, kept as a graph, and that of its square."""
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    return gx.detach(), ggx


@needs_kernel
def test_kernel_double_backward_matches_dense() -> None:
    layer = nn.Conv2d(3, 16, 5, padding=2)
    dense, tapped = twins(layer, causal_type_a(5), "taps")
    x = torch.randn(2, 3, 8, 9)
    torch.testing.assert_close(
        double_backward(tapped, x), double_backward(dense, x), rtol=1e-4, atol=1e-4
    )


@needs_kernel
@pytest.mark.parametrize(
    ("options", "layout", "dtype"),
    [
        ({"stride": 2}, "contiguous", torch.float32),
        ({"groups": 2}, "contiguous", torch.float32),
        ({}, "weight_channels_last", torch.float32),  # a channels-last output, from contiguous x
        ({}, "contiguous", torch.float64),
        ({"padding": 0}, "contiguous", torch.float32),  # output planes smaller than input's
        ({"padding_mode": "reflect"}, "contiguous", torch.float32),
    ],
)
def test_boxes_run_where_the_kernel_does_not_apply(
    options: dict[str, object],
    layout: str,
    dtype: torch.dtype,
    kernel_calls: list[tuple[int, ...]],
    box_calls: list[int],
) -> None:
    layer = nn.Conv3d(4, 6, 3, **{"padding": 1, **options}).to(dtype)
    dense, tapped = twins(layer, cross3d(), "taps")
    x = torch.randn(2, 4, 6, 7, 8, dtype=dtype)
    if layout == "weight_channels_last":
        for model in (dense, tapped):
            model.to(memory_format=torch.channels_last_3d)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-4, atol=1e-4)
    assert box_calls == [3]
    assert kernel_calls == []


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "boxes"])
def test_autocast_runs_taps_in_its_dtype(
    kernel: bool, kernel_calls: list[tuple[int, ...]], box_calls: list[int]
) -> None:
    # Dense under CPU autocast computes in bfloat16; so do the taps, in the boxes.
    layer = nn.Conv3d(4, 16, 3, padding=1)
    dense, tapped = twins(layer, cross3d(), "taps")
    x = torch.randn(1, 4, 5, 6, 7, requires_grad=True)
    with contextlib.nullcontext() if kernel else kernel_off():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = dense(x), tapped(x)
        got.float().sum().backward()
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=5e-2)
    assert tapped.parametrizations.weight.original.grad.dtype == torch.float32
    assert box_calls == [3]
    assert kernel_calls == []


def test_boxes_run_without_the_kernel(
    no_kernel: None, kernel_calls: list[tuple[int, ...]], box_calls: list[int]
) -> None:
    layer = nn.Conv3d(4, 6, 3, padding=1)
    dense, tapped = twins(layer, cross3d(), "taps")
    x = torch.randn(2, 4, 6, 7, 8)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-4, atol=1e-4)
    assert box_calls == [3]
    assert kernel_calls == []
    assert tap_kernel.status() == "MASKPARAM_TAP_KERNEL=0 turns it off"


@needs_kernel
def test_kernel_respects_the_thread_count(kernel_calls: list[tuple[int, ...]]) -> None:
    layer = nn.Conv3d(8, 32, 3, padding=1)
    dense, tapped = twins(layer, cross3d(), "taps")
    x = torch.randn(2, 8, 6, 7, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(tapped, x)
    finally:
        torch.set_num_threads(threads)
    assert_same(run(dense, x), one, rtol=1e-4, atol=1e-4)
    assert len(kernel_calls) == 1


@needs_kernel
@pytest.mark.parametrize("channels", [(16, 32), (32, 16), (8, 8)], ids=str)
def test_kernel_results_are_the_same_bits_from_call_to_call(channels: tuple[int, int]) -> None:
    # Each output is one thread's sum in a fixed order, and the weight gradient adds up
    # per-thread sums over fixed shares of the planes: the same inputs give the same bits, as
    # a dense conv does, however the threads are scheduled. (Shares taken as threads come
    # free, a guided schedule, made the weight gradient differ in its last bits here.)
    c_in, c_out = channels
    tapped = apply_mask(nn.Conv3d(c_in, c_out, 3, padding=1), cross3d(), execution="taps")
    x = torch.randn(2, c_in, 12, 16, 16)
    grad = torch.randn(2, c_out, 12, 16, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 4))  # more threads than cores: they finish unevenly
    try:
        results = [run(tapped, x, grad) for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(again[name], value), name


@needs_kernel
def test_kernel_under_inference_mode_and_no_grad(kernel_calls: list[tuple[int, ...]]) -> None:
    layer = nn.Conv2d(3, 8, 5, padding=2)
    dense, tapped = twins(layer, causal_type_a(5), "taps")
    x = torch.randn(1, 3, 10, 10)
    with torch.inference_mode():
        torch.testing.assert_close(tapped(x), dense(x))
    with torch.no_grad():
        torch.testing.assert_close(tapped(x), dense(x))
    assert len(kernel_calls) == 2


@needs_kernel
def test_kernel_keeps_masked_taps_exactly_zero_through_training() -> None:
    layer = nn.Conv3d(4, 32, 3, padding=1)
    apply_mask(layer, cross3d(), execution="taps")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(2, 4, 5, 5, 5)).square().mean().backward()
        opt.step()
    assert torch.count_nonzero(layer.weight[:, :, ~cross3d()]) == 0
    assert layer.parametrizations.weight.original.grad[:, :, ~cross3d()].abs().max() == 0


@needs_kernel
@pytest.mark.parametrize("execution", ["taps", "auto"])
def test_kernel_runs_masks_too_fragmented_for_boxes(
    execution: str, kernel_calls: list[tuple[int, ...]]
) -> None:
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    layer = nn.Conv3d(4, 16, 7, padding=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernel takes it
        dense, tapped = twins(layer, mask, execution)
        assert tapped.__dict__[_forward.EXECUTION_ATTR].boxes is None
        x = torch.randn(2, 4, 9, 10, 11)
        grad = torch.randn_like(dense(x))
        assert_same(run(dense, x, grad), run(tapped, x, grad), rtol=1e-4, atol=1e-4)
    if execution == "taps":
        assert len(kernel_calls) == 1
        # Channels-last input runs the kernel too.
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        assert_same(run(dense, x_cl, grad), run(tapped, x_cl, grad), rtol=1e-4, atol=1e-4)
        assert len(kernel_calls) == 2
        # A call the kernel does not take (a float64 input) falls back to dense, and says so.
        for model in (dense, tapped):
            model.double()
        x64, grad64 = x.double(), grad.double()
        with pytest.warns(UserWarning, match="the tap kernel does not take this call"):
            assert_same(run(dense, x64, grad64), run(tapped, x64, grad64))


@needs_kernel
def test_fragmented_mask_double_backward_matches_dense() -> None:
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    layer = nn.Conv3d(2, 16, 7, padding=3)
    dense, tapped = twins(layer, mask, "taps")
    assert tapped.__dict__[_forward.EXECUTION_ATTR].boxes is None
    x = torch.randn(1, 2, 5, 6, 7)
    torch.testing.assert_close(
        double_backward(tapped, x), double_backward(dense, x), rtol=1e-4, atol=1e-4
    )


def test_tap_table_offsets_and_indices() -> None:
    offsets, index = tap_kernel.tap_table(((0, 0), (0, 2), (1, 1)), (2, 3), (1, 2), (0, 2))
    assert offsets.tolist() == [[0, 0, -2], [0, 0, 2], [0, 1, 0]]
    assert index.tolist() == [0, 2, 4]


def test_deepcopy_of_a_layer_run_by_the_kernel() -> None:
    layer = nn.Conv3d(2, 16, 3, padding=1)
    apply_mask(layer, cross3d(), execution="taps")
    x = torch.randn(1, 2, 4, 4, 4)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))


# -- under torch.compile -------------------------------------------------------------------------


def _recording_backend(graphs: list[torch.fx.GraphModule]):  # type: ignore[no-untyped-def]
    """AOTAutograd that keeps the forward and backward graphs and runs them as they are."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _ops(graphs: list[torch.fx.GraphModule]) -> list[str]:
    return [str(node.target) for gm in graphs for node in gm.graph.nodes]


@needs_kernel
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_runs_the_kernel_as_a_custom_op(dynamic: bool) -> None:
    layer = nn.Conv3d(4, 16, 3, padding=1)
    dense, tapped = twins(layer, cross3d(), "taps")
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(
        tapped, fullgraph=True, dynamic=dynamic, backend=_recording_backend(graphs)
    )
    for shape in [(2, 4, 5, 6, 7), (1, 4, 6, 5, 8)]:
        x = torch.randn(shape)
        grad = torch.randn(shape[0], 16, *shape[2:])
        assert_same(run(dense, x, grad), run(compiled, x, grad), rtol=1e-4, atol=1e-4)
    ops = _ops(graphs)
    assert "maskparam.tap_conv.default" in ops  # forward graph
    assert "maskparam.tap_conv_backward.default" in ops  # backward graph
    assert not any("convolution" in op for op in ops)


@needs_kernel
def test_torch_compile_with_inductor_matches_dense() -> None:
    layer = nn.Conv2d(3, 32, 5, padding=2)
    dense, tapped = twins(layer, causal_type_a(5), "taps")
    compiled = torch.compile(tapped, fullgraph=True)
    x = torch.randn(2, 3, 9, 10)
    grad = torch.randn(2, 32, 9, 10)
    assert_same(run(dense, x, grad), run(compiled, x, grad), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_torch_compile_falls_back_to_the_boxes_where_the_kernel_does_not_apply() -> None:
    layer = nn.Conv3d(4, 16, 3, padding=1, stride=2)
    dense, tapped = twins(layer, cross3d(), "taps")
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(tapped, fullgraph=True, backend=_recording_backend(graphs))
    x = torch.randn(2, 4, 6, 7, 8)
    assert_same(run(dense, x), run(compiled, x), rtol=1e-4, atol=1e-4)
    assert not any("maskparam" in op for op in _ops(graphs))


@needs_kernel
def test_custom_ops_pass_opcheck() -> None:
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    w = torch.where(cross3d(), torch.randn(8, 3, 3, 3, 3), 0).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    offsets, index = tap_kernel.tap_table(
        tuple(map(tuple, cross3d().nonzero().tolist())), (3, 3, 3), (1, 1, 1), (1, 1, 1)
    )
    torch.library.opcheck(torch.ops.maskparam.tap_conv, (x, w, b, offsets, index, [4, 5, 6]))
    grad = torch.randn(2, 8, 4, 5, 6)
    torch.library.opcheck(
        torch.ops.maskparam.tap_conv_backward,
        (grad, x.detach(), w.detach(), offsets, index, [True, True, True]),
    )


# -- when it takes a call: the README's table against kernel.takes ----------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
ISA_OF_CPU = {"x86-64 with AVX-512": "avx512", "x86-64 with AVX2 and FMA": "avx2", "ARM64": "neon"}
Variant = Callable[[dict[str, Any]], None]
# What each cell of the table means, as changes to a call the kernel takes.
CELLS: dict[str, list[Variant]] = {
    "any": [],
    "float32": [],
    "contiguous or channels-last": [],
    "1, 1, planes as large as the input's": [],
    "float64, or under autocast": [
        lambda call: call.update(dtype=torch.float64),
        lambda call: call.update(autocast=True),
    ],
    "stride > 1, groups > 1, smaller planes, non-zero padding mode": [
        lambda call: call.update(stride=2),
        lambda call: call.update(groups=2),
        lambda call: call.update(padding=0),
        lambda call: call.update(padding_mode="reflect"),
    ],
}
# The conditions of kernel.CONDITIONS that each cell of a row where the kernel runs states.
STATES = {
    "float32": ["float32"],
    "contiguous or channels-last": ["contiguous or channels-last input"],
    "1, 1, planes as large as the input's": [
        "stride 1",
        "one group",
        "output planes the size of the input's",
    ],
}


def readme_table() -> list[list[str]]:
    text = README.read_text().split("### Faster masked convolutions", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # no header
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def explained_path(device: str, changes: dict[str, Any]) -> str:
    call = {"dtype": torch.float32, "stride": 1, "groups": 1, "padding": 1} | changes
    conv = nn.Conv2d(
        4, 8, 3, stride=call["stride"], padding=call["padding"], groups=call["groups"],
        padding_mode=call.get("padding_mode", "zeros"),
    )  # fmt: skip
    layer = apply_mask(conv.to(device, call["dtype"]), PLUS, execution="taps")
    x = torch.randn(2, 4, 6, 6, device=device, dtype=call["dtype"])
    if call.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bool(call.get("autocast")))
    with autocast:
        return taps.explain(layer, x).path


def test_readme_table_matches_when_the_kernel_takes_a_call() -> None:
    table = readme_table()
    assert len(table) >= 5
    conditions = tap_kernel.CONDITIONS.split(", ")
    for cpu, dtype, layout, options, runs in table:
        device = "cuda" if cpu == "CUDA" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            continue
        cells = (dtype, layout, options)
        assert all(cell in CELLS for cell in cells), (
            f"README cells this test does not know: {cells}"
        )
        if runs.startswith("C kernel"):
            isa = ISA_OF_CPU[cpu]
            assert isa in build.ISAS
            assert f"`{isa}`" in runs
            assert all(c in conditions for cell in cells for c in STATES[cell])
            if tap_kernel.isa() == isa:
                assert f"({tap_kernel.sizes()['lanes']} lanes" in runs
                assert explained_path(device, {}) == "kernel"
                assert explained_path(device, {"channels_last": True}) == "kernel"
            continue
        assert runs == "boxes"
        variants = [v for cell in cells for v in CELLS[cell]]
        assert variants, f"a row of boxes that says no condition the kernel lacks: {cells}"
        for variant in variants:
            changes: dict[str, Any] = {}
            variant(changes)
            assert explained_path(device, changes) in ("fused", "reference"), (cpu, cells, changes)
