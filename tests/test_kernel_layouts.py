"""The tap kernel on channels-last input, and under every tuning: the same sums as dense."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import taps
from maskparam.taps import kernel as tap_kernel
from maskparam.taps import tune
from tests.strategies import sparse_kernel_masks
from tests.tap_helpers import (
    assert_same,
    ball,
    causal_type_a,
    cross3d,
    kernel_off,
    needs_kernel,
    run,
    twins,
)

pytestmark = needs_kernel


def channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def is_channels_last(t: torch.Tensor) -> bool:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.is_contiguous(memory_format=fmt)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per call of the kernel's forward, whether its input was channels-last."""
    calls: list[bool] = []
    real = tap_kernel.TapKernel.apply

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(is_channels_last(x) and not x.is_contiguous())
        return real(x, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(tap_kernel.TapKernel, "apply", counted)
    return calls


def check_channels_last(layer: nn.Module, mask: torch.Tensor, x: torch.Tensor) -> None:
    """Output and every gradient of channels-last ``x`` as dense gives them, in its layout."""
    dense, tapped = twins(layer, mask, "taps")
    x = channels_last(x)
    grad = channels_last(torch.randn_like(dense(x)))
    expected, got = run(dense, x, grad), run(tapped, x, grad)
    # Float32 sums of up to 2**15 terms each, in another order than dense's: both stray
    # from the float64 sums by up to about 3e-4 on the largest case.
    assert_same(expected, got, rtol=1e-4, atol=1e-3)
    assert is_channels_last(got["out"])
    assert is_channels_last(got["input"])


@st.composite
def channels_last_cases(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-D or 3-D stride-1 conv that keeps its planes' size, a sparse mask, an input."""
    ndim = draw(st.sampled_from([2, 3]))
    kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = [d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True)]
    if ndim == 3:  # any depth padding: fewer or more output planes than input planes
        padding[0] = draw(st.integers(0, padding[0] + 1))
    # channel counts on both sides of a vector's width (8 and 16 lanes), and several vectors
    c_in = draw(st.sampled_from([2, 3, 8, 13, 16, 17]))
    c_out = draw(st.sampled_from([1, 5, 8, 16, 17, 24, 48, 80]))
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[ndim]
    layer = conv(c_in, c_out, kernel, padding=tuple(padding), dilation=dilation)
    if draw(st.booleans()):
        layer.bias = None
    sizes = [draw(st.integers(2, 19)) for _ in range(ndim)]
    if ndim == 3:  # enough depth for an output
        sizes[0] = max(sizes[0], dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    x = torch.randn(draw(st.integers(1, 3)), c_in, *sizes)
    mask = draw(sparse_kernel_masks(kernel_size=kernel).filter(lambda m: bool(m.any())))
    return layer, mask, x


@given(case=channels_last_cases())
def test_channels_last_input_runs_the_kernel_and_matches_dense(
    case: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    layer, mask, x = case
    calls: list[int] = []
    real = tap_kernel.TapKernel.apply

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    tap_kernel.TapKernel.apply = counted  # type: ignore[method-assign]
    try:
        check_channels_last(layer, mask, x)
    finally:
        tap_kernel.TapKernel.apply = real  # type: ignore[method-assign]
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("cls", "mask", "shape", "c_out"),
    [
        (nn.Conv3d, cross3d(), (2, 16, 9, 10, 11), 32),
        (nn.Conv3d, cross3d(), (2, 8, 6, 7, 33), 8),  # 8 output channels: half a vector
        (nn.Conv3d, ball(2), (1, 8, 6, 7, 8), 64),
        (nn.Conv2d, causal_type_a(), (2, 3, 13, 17), 64),
        (nn.Conv2d, causal_type_a(), (1, 64, 9, 40), 64),
        # output channels that are no multiple of a vector, and more than a tile holds
        (nn.Conv3d, cross3d(), (1, 5, 4, 5, 6), 80),
        (nn.Conv3d, cross3d(), (1, 5, 4, 5, 6), 40),
        # an output of 2 MB or more, whose stores stream on AVX-512
        (nn.Conv3d, cross3d(), (1, 16, 8, 64, 64), 32),
    ],
    ids=str,
)
def test_channels_last_shaped_kernels(
    cls: type[nn.Module],
    mask: torch.Tensor,
    shape: tuple[int, ...],
    c_out: int,
    kernel_calls: list[bool],
) -> None:
    padding = tuple(k // 2 for k in mask.shape)
    layer = cls(shape[1], c_out, tuple(mask.shape), padding=padding)
    check_channels_last(layer, mask, torch.randn(shape))
    assert kernel_calls == [True]


def test_explain_names_the_kernel_for_channels_last_input() -> None:
    layer = nn.Conv3d(4, 8, 3, padding=1)
    _, tapped = twins(layer, cross3d(), "taps")
    x = channels_last(torch.randn(2, 4, 5, 6, 7))
    assert taps.explain(tapped, x).path == "kernel"


def test_contiguous_input_with_channels_last_weight_runs_the_boxes(
    kernel_calls: list[bool],
) -> None:
    """Its output is channels-last, as dense's would be: the kernel writes x's layout only."""
    dense, tapped = twins(nn.Conv3d(4, 8, 3, padding=1), cross3d(), "taps")
    for model in (dense, tapped):
        model.to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 4, 5, 6, 7)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-4, atol=1e-4)
    assert kernel_calls == []


def test_torch_compile_runs_the_channels_last_kernel() -> None:
    dense, tapped = twins(nn.Conv3d(4, 8, 3, padding=1), cross3d(), "taps")
    compiled = torch.compile(tapped, backend="aot_eager", fullgraph=True)
    x = channels_last(torch.randn(2, 4, 5, 6, 7))
    grad = channels_last(torch.randn(2, 8, 5, 6, 7))
    got = run(compiled, x, grad)
    assert_same(run(dense, x, grad), got, rtol=1e-4, atol=1e-4)
    assert is_channels_last(got["out"])
    assert is_channels_last(got["input"])


def test_custom_ops_pass_opcheck_on_channels_last_input() -> None:
    x = channels_last(torch.randn(2, 3, 4, 5, 6)).requires_grad_()
    w = torch.where(cross3d(), torch.randn(8, 3, 3, 3, 3), 0).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    offsets, index = tap_kernel.tap_table(
        tuple(map(tuple, cross3d().nonzero().tolist())), (3, 3, 3), (1, 1, 1), (1, 1, 1)
    )
    torch.library.opcheck(torch.ops.maskparam.tap_conv, (x, w, b, offsets, index, [4, 5, 6]))
    grad = channels_last(torch.randn(2, 8, 4, 5, 6))
    torch.library.opcheck(
        torch.ops.maskparam.tap_conv_backward,
        (grad, x.detach(), w.detach(), offsets, index, [True, True, True]),
    )


# -- every tuning computes the same sums ------------------------------------------------------


def every_tuning() -> list[tuple[int, int, int]]:
    options = tune.candidates()
    return list(itertools.product(options["stream"], options["tile"], options["chunk"]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    ("shape", "c_out"),
    [((2, 20, 5, 9, 11), 48), ((1, 16, 8, 48, 48), 40), ((3, 3, 4, 5, 6), 5)],
    ids=str,
)
def test_every_tuning_computes_the_same_sums(
    layout: str, shape: tuple[int, ...], c_out: int
) -> None:
    """Each variant against float64 dense; the forward and input gradient to the bit alike.

    The tuning changes how positions and output channels are grouped, not the order in
    which a sum adds its terms, so those two agree bit for bit; the weight gradient's
    rectangles (``chunk``) change how per-thread partial sums are grouped, so it agrees to
    float rounding. The second shape has an output of 2 MB or more, which streams.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    x = channels_last(x) if layout == "channels_last" else x
    w = torch.where(cross3d(), torch.randn(c_out, shape[1], 3, 3, 3, generator=gen), 0)
    bias = torch.randn(c_out, generator=gen)
    grad = torch.randn(shape[0], c_out, *shape[2:], generator=gen)
    grad = channels_last(grad) if layout == "channels_last" else grad
    offsets, index = tap_kernel.tap_table(
        tuple(map(tuple, cross3d().nonzero().tolist())), (3, 3, 3), (1, 1, 1), (1, 1, 1)
    )
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    want = F.conv3d(x64, w64, b64, padding=1)
    want.backward(grad.double())
    first: tuple[torch.Tensor, ...] | None = None
    for tuning in every_tuning():
        y = tap_kernel.conv(x, w, bias, offsets, index, shape[2:], tuning)
        gx, gw, gb = tap_kernel.conv_backward(
            grad, x, w, offsets, index, (True, True, True), tuning
        )
        assert gx is not None
        assert gw is not None
        assert gb is not None
        assert y.is_contiguous(memory_format=x_format(x))
        assert gx.is_contiguous(memory_format=x_format(x))
        # the kernel's weight gradient is zero off the taps (the parametrization masks it)
        grad_w = torch.where(cross3d(), w64.grad, 0)
        for got, expected in ((y, want), (gx, x64.grad), (gw, grad_w), (gb, b64.grad)):
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)
        if first is None:
            first = (y, gx)
        else:
            assert torch.equal(y, first[0]), tuning
            assert torch.equal(gx, first[1]), tuning


def x_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if not x.is_contiguous() else torch.contiguous_format


def active_taps_only(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The conv of a 3x3x3 kernel with padding 1 in float64, as a sum over the active taps
    only: the sums the kernel makes (dense also multiplies masked taps' zeros, so an inf or
    NaN input spreads through them too)."""
    padded = F.pad(x.double(), (1, 1, 1, 1, 1, 1))
    d, h, width = x.shape[2:]
    out = torch.zeros(x.shape[0], w.shape[0], d, h, width, dtype=torch.float64)
    for a, b, c in mask.nonzero().tolist():
        window = padded[:, :, a : a + d, b : b + h, c : c + width]
        out += torch.einsum("nczyx,oc->nozyx", window, w[:, :, a, b, c].double())
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("c_in", "c_out"), [(5, 3), (6, 8), (16, 16), (3, 40)], ids=str)
def test_a_non_finite_input_spreads_only_through_active_taps(
    layout: str, c_in: int, c_out: int
) -> None:
    """Every term the kernel adds is a real product: no padding channel or neighbouring
    position times a zero weight, which would turn an inf or NaN of one position into NaN
    at another."""
    _, tapped = twins(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), cross3d(), "taps")
    x = torch.randn(2, c_in, 4, 5, 6)
    x[0, -1, 1, 2, 3] = float("inf")  # the last channel: the one before any padding
    x[1, 0, 2, 4, 5] = float("nan")  # the first channel, at the end of a row
    x = channels_last(x) if layout == "channels_last" else x
    with torch.no_grad():
        got = tapped(x)
        expected = active_taps_only(x, tapped.weight, cross3d())
    assert got.isnan().any()
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(got[finite].double(), expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["kernel", "boxes"])
def test_dense_spreads_a_nan_through_masked_taps_and_taps_do_not(path: str) -> None:
    """As the docs say: 27 outputs of a 3x3x3 window for dense, 7 for a cross's taps."""
    dense, tapped = twins(nn.Conv3d(4, 8, 3, padding=1, bias=False), cross3d(), "taps")
    x = torch.randn(1, 4, 5, 6, 7)
    x[0, 1, 2, 3, 3] = float("nan")
    with torch.no_grad(), kernel_off() if path == "boxes" else contextlib.nullcontext():
        assert int(dense(x).isnan().any(1).sum()) == 27
        assert int(tapped(x).isnan().any(1).sum()) == 7
