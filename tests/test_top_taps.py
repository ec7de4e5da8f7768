from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam import masks
from maskparam.apply import apply_mask, get_mask
from maskparam.model import apply_masks


@st.composite
def kernel_shapes(draw: st.DrawFn) -> tuple[int, ...]:
    """A small conv weight shape: 1 to 3 channels each side, a 1-D to 3-D kernel."""
    ndim = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), *kernel)


def integer_weight(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integer values: every sum of squares is exact, in any order of summation."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=gen).to(dtype)


def by_hand(weight: torch.Tensor) -> list[float]:
    """Each tap's L2 norm over the first two dims, in raster order, one tap at a time."""
    spatial = weight.shape[2:]
    flat = weight.double().reshape(weight.shape[0], weight.shape[1], -1)
    return [
        math.sqrt(sum(float(v) ** 2 for v in flat[:, :, t].flatten()))
        for t in range(math.prod(spatial))
    ]


def expected(weight: torch.Tensor, count: int) -> torch.Tensor:
    """The documented rule, written out: largest norm first, lower raster index on ties."""
    norms = by_hand(weight)
    order = sorted(range(len(norms)), key=lambda t: (-norms[t], t))
    keep = torch.zeros(len(norms), dtype=torch.bool)
    keep[order[:count]] = True
    return keep.reshape(weight.shape[2:])


# -- what it keeps --------------------------------------------------------------------------


@given(shape=kernel_shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_keeps_exactly_k_taps(shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    k = data.draw(st.integers(1, math.prod(shape[2:])))
    mask = masks.top_taps(weight, k)
    assert mask.dtype == torch.bool
    assert mask.device.type == "cpu"
    assert mask.shape == shape[2:]
    assert int(mask.sum()) == k


@given(shape=kernel_shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_keeps_the_taps_of_largest_norm(
    shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    weight = integer_weight(shape, seed, torch.float64)
    k = data.draw(st.integers(1, math.prod(shape[2:])))
    assert torch.equal(masks.top_taps(weight, k), expected(weight, k))


@given(shape=kernel_shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_finds_planted_taps(shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(shape, generator=gen) - 0.5  # every value in [-0.5, 0.5)
    taps = math.prod(shape[2:])
    planted = data.draw(st.lists(st.integers(0, taps - 1), min_size=1, unique=True))
    flat = weight.view(shape[0], shape[1], taps)
    for t in planted:
        # One large value anywhere among the channel pairs outweighs any other tap's norm.
        c_out, c_in = (int(i) for i in torch.randint(0, 3, (2,), generator=gen))
        flat[c_out % shape[0], c_in % shape[1], t] = 10.0 * (-1) ** t
    mask = masks.top_taps(weight, len(planted))
    assert sorted(mask.flatten().nonzero().flatten().tolist()) == sorted(planted)


@given(shape=kernel_shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_unchanged_by_channel_permutations(
    shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    weight = integer_weight(shape, seed, torch.float32)
    k = data.draw(st.integers(1, math.prod(shape[2:])))
    out_order = torch.tensor(data.draw(st.permutations(range(shape[0]))))
    in_order = torch.tensor(data.draw(st.permutations(range(shape[1]))))
    permuted = weight[out_order][:, in_order]
    assert torch.equal(masks.top_taps(permuted, k), masks.top_taps(weight, k))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_weight_in_its_own_layout(groups: int) -> None:
    conv = nn.ConvTranspose2d(4, 6, (3, 2), groups=groups)
    assert conv.weight.shape == (4, 6 // groups, 3, 2)  # (in, out / groups, *kernel_size)
    with torch.no_grad():
        conv.weight.copy_(integer_weight(tuple(conv.weight.shape), 7, torch.float32))
    w = conv.weight.detach()
    in_ch, out_per_group = w.shape[:2]
    pairs = [(i, o) for i in range(in_ch) for o in range(out_per_group)]
    norms = [
        math.sqrt(sum(float(w[i, o, a, b]) ** 2 for i, o in pairs))
        for a in range(3)
        for b in range(2)
    ]
    order = sorted(range(6), key=lambda t: (-norms[t], t))
    for k in range(1, 7):
        mask = masks.top_taps(conv.weight, k)
        assert sorted(mask.flatten().nonzero().flatten().tolist()) == sorted(order[:k])
    apply_mask(conv, mask := masks.top_taps(conv.weight, 3))  # it fits the layer it came from
    assert torch.equal(get_mask(conv), mask)


def test_conv_and_conv_transpose_layouts_agree() -> None:
    # A ConvTranspose weight is the transpose of a Conv weight's first two dims; the norm over
    # both is the same either way.
    weight = integer_weight((3, 5, 3, 3), 3, torch.float32)
    for k in range(1, 10):
        assert torch.equal(masks.top_taps(weight, k), masks.top_taps(weight.transpose(0, 1), k))


def test_ties_go_to_the_lower_raster_index() -> None:
    for k in range(1, 28):
        mask = masks.top_taps(torch.ones(2, 3, 3, 3, 3), k)
        assert mask.flatten().nonzero().flatten().tolist() == list(range(k))
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 2, 2] = weight[0, 0, 0, 1] = -1.0  # equal norms: 1 (index 1) beats 8
    assert masks.top_taps(weight, 1).flatten().nonzero().flatten().tolist() == [1]
    assert masks.top_taps(weight, 3).flatten().nonzero().flatten().tolist() == [0, 1, 8]


@pytest.mark.parametrize(
    ("fraction", "count"),
    [
        (1.0, 9),
        (0.3, 3),  # 2.7
        (0.25, 2),  # 2.25
        (0.5, 4),  # 4.5: a half goes to the even count, as Python's round does
        (1.5 / 9, 2),  # 1.5 -> 2, the even count
        (2.5 / 9, 2),  # 2.5 -> 2
        (0.01, 1),  # 0.09 rounds to 0: at least one tap
        (0.05, 1),  # 0.45
        (0.1, 1),  # 0.9
    ],
)
def test_fraction_rounds_to_the_nearest_count(fraction: float, count: int) -> None:
    weight = torch.randn(4, 4, 3, 3)
    assert int(masks.top_taps(weight, fraction=fraction).sum()) == count
    assert torch.equal(masks.top_taps(weight, fraction=fraction), masks.top_taps(weight, count))


@given(taps=st.integers(1, 27), fraction=st.floats(1e-6, 1.0))
def test_fraction_matches_random_count(taps: int, fraction: float) -> None:
    # The same fraction keeps as many taps as masks.random does (but at least one).
    mask = masks.top_taps(torch.randn(2, 2, taps), fraction=fraction)
    assert int(mask.sum()) == max(1, int(masks.random(taps, fraction).sum()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    weight = integer_weight((8, 4, 3, 3), 1, dtype)
    reference = masks.top_taps(weight.double(), 4)
    assert torch.equal(masks.top_taps(weight, 4), reference)
    assert torch.equal(masks.top_taps(weight, fraction=0.5), reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_large_values_do_not_overflow(dtype: torch.dtype) -> None:
    # The squares of these would overflow in the weight's dtype (and, for bfloat16, even in
    # float32), making every tap's norm inf.
    big = torch.finfo(dtype).max / 2
    weight = torch.full((4, 4, 3), big, dtype=dtype)
    weight[:, :, 1] /= 4
    weight[:, :, 2] /= 2
    assert masks.top_taps(weight, 2).tolist() == [True, False, True]


def test_tiny_values_still_rank() -> None:
    weight = torch.tensor([[[1e-300, 3e-300, 2e-300]]], dtype=torch.float64)
    assert masks.top_taps(weight, 1).tolist() == [False, True, False]
    assert masks.top_taps(torch.zeros(1, 1, 3), 1).tolist() == [True, False, False]


def test_integer_weights() -> None:
    weight = torch.tensor([[[1, -3, 2]], [[0, 1, -2]]])
    assert masks.top_taps(weight, 2).tolist() == [False, True, True]


def test_parameter_with_grad_and_device(device: torch.device) -> None:
    conv = nn.Conv2d(2, 3, 3).to(device)
    with torch.no_grad():
        conv.weight.copy_(integer_weight((3, 2, 3, 3), 5, torch.float32))
    mask = masks.top_taps(conv.weight, 5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, expected(conv.weight.detach().cpu(), 5))
    assert conv.weight.grad is None


def test_masked_layer_ranks_its_masked_weight() -> None:
    # conv.weight of a masked layer is masked: its masked taps rank last. The stored values,
    # masked taps included, rank as the docstring says.
    conv = nn.Conv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).reshape(1, 1, 3, 3))
    apply_mask(conv, masks.from_text("#.#\n...\n#.#"))
    assert masks.top_taps(conv.weight, 2).flatten().nonzero().flatten().tolist() == [6, 8]
    stored = conv.parametrizations.weight.original
    assert masks.top_taps(stored, 2).flatten().nonzero().flatten().tolist() == [7, 8]


def test_returns_a_fresh_tensor() -> None:
    weight = torch.randn(2, 2, 3)
    first = masks.top_taps(weight, 1)
    kept = first.clone()
    first.fill_(True)
    assert torch.equal(masks.top_taps(weight, 1), kept)


def test_numpy_numbers_are_accepted() -> None:
    weight = torch.randn(2, 2, 3, 3)
    assert torch.equal(masks.top_taps(weight, np.int64(3)), masks.top_taps(weight, 3))
    assert torch.equal(masks.top_taps(weight, fraction=np.float32(0.5)), masks.top_taps(weight, 4))


def _convs() -> list[nn.Module]:
    return [
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.ReLU(),
    ]


def test_smoke_with_apply_masks_and_taps_execution() -> None:
    # Prune every 3x3 Conv2d of a model to 30% of its taps, chosen from its own weights,
    # and run only those taps.
    torch.manual_seed(0)
    model = nn.Sequential(*_convs(), nn.Conv1d(4, 4, 3))
    kept = {
        name: masks.top_taps(m.weight, fraction=0.3)
        for name, m in model.named_children()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    }
    dense = [p.detach().clone() for p in model.parameters()]
    masked = apply_masks(
        model,
        lambda name, m: (
            masks.top_taps(m.weight, fraction=0.3)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
            else None
        ),
        execution="taps",
    )
    assert masked == ["0", "2"]
    for name in masked:
        assert torch.equal(get_mask(model.get_submodule(name)), kept[name])
        assert int(kept[name].sum()) == 3  # round(0.3 * 9)
    x = torch.randn(2, 1, 6, 6)
    out = model[:6](x)
    out.square().mean().backward()
    # Same result as the dense layers with the pruned taps zeroed by hand.
    reference = nn.Sequential(*_convs())
    with torch.no_grad():
        for p, value in zip(reference.parameters(), dense, strict=False):
            p.copy_(value)
        reference[0].weight[:, :, ~kept["0"]] = 0
        reference[2].weight[:, :, ~kept["2"]] = 0
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (
            nn.Conv2d(1, 1, 3),
            TypeError,
            r"top_taps expects a conv weight as a tensor\. Pass "
            r"its weight, such as conv\.weight\. Got Conv2d\.",
        ),
        ([[[1.0, 2.0]]], TypeError, r"top_taps expects a conv weight as a tensor\. Got list\."),
        (
            torch.ones(1, 1, 3, dtype=torch.bool),
            TypeError,
            r"expects a real-valued weight, floating point or integer\. Got dtype=torch\.bool\.",
        ),
        (torch.ones(1, 1, 3, dtype=torch.complex64), TypeError, r"Got dtype=torch\.complex64\."),
        (torch.tensor(1.0), ValueError, r"conv weight of at least 3 dims.*Got shape=\(\)\."),
        (torch.ones(9), ValueError, r"at least 3 dims.*Got shape=\(9,\)\."),
        (torch.ones(3, 3), ValueError, r"at least 3 dims.*Got shape=\(3, 3\)\."),
        (
            torch.ones(2, 2, 3, device="meta"),
            ValueError,
            r"a tensor on the meta device has none\. Got a meta tensor of shape=\(2, 2, 3\)\.",
        ),
        (
            torch.ones(0, 2, 3),
            ValueError,
            r"a weight with at least one entry\. Got shape=\(0, 2, 3\)\.",
        ),
        (
            torch.tensor([[[1.0, math.nan, 0.0]]]),
            ValueError,
            r"cannot rank taps whose weights are NaN or infinite\. Got 1 such values of 3",
        ),
        (
            torch.tensor([[[1.0, math.inf, -math.inf]]]),
            ValueError,
            r"NaN or infinite\. Got 2 such values of 3 in a weight of shape=\(1, 1, 3\)\.",
        ),
        (torch.tensor([[[1.0, math.inf]]], dtype=torch.float16), ValueError, "NaN or infinite"),
    ],
    ids=[
        "module",
        "list",
        "bool",
        "complex",
        "0-d",
        "1-d",
        "2-d",
        "meta",
        "empty",
        "nan",
        "inf",
        "inf-float16",
    ],
)
def test_exception_weight(weight: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        masks.top_taps(weight, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {},
            ValueError,
            r"top_taps expects exactly one of k \(a count\) and fraction \(a share of the "
            r"taps\)\. Got k=None and fraction=None\.",
        ),
        ({"k": 2, "fraction": 0.5}, ValueError, r"exactly one of.*Got k=2 and fraction=0\.5\."),
        (
            {"k": 0},
            ValueError,
            r"top_taps expects k in \[1, 9\], the taps of this kernel\. "
            r"Got k=0\.",
        ),
        ({"k": -1}, ValueError, r"k in \[1, 9\].*Got k=-1\."),
        ({"k": 10}, ValueError, r"k in \[1, 9\].*Got k=10\."),
        (
            {"k": 2.0},
            TypeError,
            r"top_taps expects k, the number of taps to keep, as an int\. Got 2\.0\.",
        ),
        ({"k": True}, TypeError, r"as an int\. Got True\."),
        ({"k": "3"}, TypeError, r"as an int\. Got '3'\."),
        ({"k": math.nan}, TypeError, r"as an int\. Got nan\."),
        (
            {"fraction": 0},
            ValueError,
            r"top_taps expects a fraction in \(0, 1\]\. Got fraction=0\.",
        ),
        ({"fraction": 1.01}, ValueError, r"fraction in \(0, 1\]\. Got fraction=1\.01\."),
        ({"fraction": -0.5}, ValueError, r"Got fraction=-0\.5\."),
        ({"fraction": math.nan}, ValueError, r"Got fraction=nan\."),
        ({"fraction": True}, TypeError, r"top_taps expects fraction as a number\. Got True\."),
        ({"fraction": "0.5"}, TypeError, r"fraction as a number\. Got '0\.5'\."),
    ],
    ids=[
        "neither",
        "both",
        "k=0",
        "k<0",
        "k>taps",
        "float-k",
        "bool-k",
        "str-k",
        "nan-k",
        "fraction=0",
        "fraction>1",
        "fraction<0",
        "nan-fraction",
        "bool-fraction",
        "str-fraction",
    ],
)
def test_exception_count(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        masks.top_taps(torch.randn(2, 2, 3, 3), **kwargs)
