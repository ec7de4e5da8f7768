"""The named shapes tap by tap: counts, definitions, defaults, symmetries, fresh tensors."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam.apply import apply_mask
from maskparam.masks import (
    ball,
    blind_spot,
    box,
    causal,
    checkerboard,
    cross,
    diamond,
    dilated,
    from_text,
    hexagonal,
    line,
    random,
)
from tests.mask_rules import by_rule
from tests.strategies import odd_kernel_sizes

# -- tap counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "taps"),
    [
        (lambda: cross(3, ndim=3), 7),
        (lambda: cross((3, 3, 3)), 7),
        (lambda: cross(5, ndim=2), 9),
        (lambda: diamond(5, ndim=2, radius=2), 13),
        (lambda: ball(3, ndim=3, radius=1), 7),
        (lambda: ball(3, ndim=3, radius=math.sqrt(2)), 19),
        (lambda: ball(3, ndim=3, radius=math.sqrt(3)), 27),
        (lambda: ball(5, ndim=3, radius=2), 33),
        (lambda: hexagonal(3), 7),
        (lambda: hexagonal(5), 19),
        (lambda: hexagonal((5, 5)), 19),
    ],
    ids=[
        "cross-3x3x3",
        "cross-tuple",
        "cross-5x5",
        "diamond-5x5-r2",
        "ball-r2=1",
        "ball-r2=2",
        "ball-r2=3",
        "ball-5x5x5-r2",
        "hex-3",
        "hex-5",
        "hex-5x5",
    ],
)
def test_tap_counts(make: Callable[[], torch.Tensor], taps: int) -> None:
    assert int(make().sum()) == taps


@pytest.mark.parametrize("r", range(5))
def test_diamond_counts_match_the_closed_forms(r: int) -> None:
    k = 2 * r + 1
    assert int(diamond(k, ndim=1).sum()) == k
    assert int(diamond(k, ndim=2).sum()) == 2 * r * r + 2 * r + 1
    if r <= 3:
        assert int(diamond(k, ndim=3).sum()) == (2 * r + 1) * (2 * r * r + 2 * r + 3) // 3


@pytest.mark.parametrize("r", range(5))
def test_hexagonal_has_the_cells_of_a_hexagon(r: int) -> None:
    assert int(hexagonal(2 * r + 1).sum()) == 3 * r * (r + 1) + 1


@given(sizes=odd_kernel_sizes())
def test_cross_is_the_centre_plus_every_axis(sizes: tuple[int, ...]) -> None:
    mask = cross(sizes)
    assert torch.equal(mask, by_rule(sizes, lambda o: sum(v != 0 for v in o) <= 1))
    assert int(mask.sum()) == 1 + sum(k - 1 for k in sizes)


# -- definitions, checked tap by tap ----------------------------------------------------------


@given(
    sizes=odd_kernel_sizes(),
    radius=st.one_of(st.none(), st.integers(0, 4), st.floats(0, 4.5)),
)
def test_diamond_is_the_l1_ball(sizes: tuple[int, ...], radius: float | None) -> None:
    r = max(sizes) // 2 if radius is None else radius
    # with the documented margin: within a relative 1e-9 of the radius counts as inside
    expected = by_rule(sizes, lambda o: sum(abs(v) for v in o) <= r * (1 + 1e-9))
    assert torch.equal(diamond(sizes, radius=radius), expected)


@given(
    sizes=odd_kernel_sizes(),
    r2=st.integers(0, 12),
    data=st.data(),
)
def test_ball_is_the_l2_ball(sizes: tuple[int, ...], r2: int, data: st.DataObject) -> None:
    spacing = data.draw(st.tuples(*(st.sampled_from([0.5, 1.0, 2.0]) for _ in sizes)))
    # spacings and squared radii here are exact in binary, so the rule needs no margin
    expected = by_rule(
        sizes, lambda o: sum((v * s) ** 2 for v, s in zip(o, spacing, strict=True)) <= r2
    )
    assert torch.equal(ball(sizes, radius=math.sqrt(r2), spacing=spacing), expected)


def test_ball_keeps_taps_exactly_on_the_sphere() -> None:
    # sqrt(3) ** 2 < 3 in floats: without the margin the corners would be lost
    assert math.sqrt(3) ** 2 < 3
    assert bool(ball(3, ndim=3, radius=math.sqrt(3)).all())
    assert torch.equal(ball(3, ndim=2, radius=0.1 * 10, spacing=0.1 * 10), cross(3, ndim=2))


@given(sizes=odd_kernel_sizes(), radius=st.floats(0, 3))
def test_blind_spot_is_everything_but_a_ball(sizes: tuple[int, ...], radius: float) -> None:
    assert torch.equal(blind_spot(sizes, radius=radius), ~ball(sizes, radius=radius))


def test_blind_spot_default_removes_only_the_centre() -> None:
    for ndim in (1, 2, 3):
        mask = blind_spot(5, ndim=ndim)
        assert int((~mask).sum()) == 1
        assert not mask[(2,) * ndim]
    assert int((~blind_spot(5, ndim=3, radius=1)).sum()) == 7


@given(sizes=odd_kernel_sizes(), data=st.data())
def test_line_keeps_one_axis(sizes: tuple[int, ...], data: st.DataObject) -> None:
    axis = data.draw(st.integers(-len(sizes), len(sizes) - 1))
    a = axis % len(sizes)
    expected = by_rule(sizes, lambda o: all(v == 0 for i, v in enumerate(o) if i != a))
    assert torch.equal(line(sizes, axis), expected)
    assert int(line(sizes, axis).sum()) == sizes[a]


def test_line_allows_an_even_size_along_its_axis() -> None:
    assert from_text("..\n##\n..", ndim=2).tolist() == line((3, 2), axis=1).tolist()


def test_box_is_every_tap_even_sizes_included() -> None:
    mask = box((2, 3, 4))
    assert mask.shape == (2, 3, 4)
    assert bool(mask.all())
    assert torch.equal(box(4, ndim=2), torch.ones(4, 4, dtype=torch.bool))


# -- documented defaults ----------------------------------------------------------------------


def test_ndim_may_repeat_the_tuple_length() -> None:
    assert torch.equal(cross((3, 5), ndim=2), cross((3, 5)))


def test_numpy_numbers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    assert torch.equal(cross(np.int64(3), ndim=np.int64(2)), cross(3, ndim=2))
    assert torch.equal(cross(tuple(np.array([3, 5]))), cross((3, 5)))
    assert torch.equal(ball(5, ndim=2, radius=np.float32(1.5)), ball(5, ndim=2, radius=1.5))
    assert torch.equal(line((3, 3), np.int64(-1)), line((3, 3), -1))
    assert int(random(np.int64(10), np.float64(0.3)).sum()) == 3


def test_diamond_default_radius_is_the_largest_half_size() -> None:
    assert torch.equal(diamond(5, ndim=2), diamond(5, ndim=2, radius=2))
    assert torch.equal(diamond((3, 7)), diamond((3, 7), radius=3))
    # reaching the edge along the longest axis means a 2-D diamond inside a (1, 5, 5) kernel
    assert torch.equal(diamond((1, 5, 5))[0], diamond(5, ndim=2))


def test_ball_default_radius_is_the_largest_physical_half_size() -> None:
    assert torch.equal(ball(3, ndim=3), cross(3, ndim=3))
    assert torch.equal(ball((3, 7)), ball((3, 7), radius=3))
    # physical half-sizes 1 * 2.5 and 2 * 1: the default radius is 2.5
    assert torch.equal(ball((3, 5), spacing=(2.5, 1)), ball((3, 5), radius=2.5, spacing=(2.5, 1)))
    assert torch.equal(ball((3, 5), spacing=2), ball((3, 5), spacing=(2, 2)))


def test_causal_defaults_to_type_a() -> None:
    assert torch.equal(causal(3, ndim=2), causal(3, ndim=2, kind="A"))


# -- symmetry ---------------------------------------------------------------------------------

SYMMETRIC: dict[str, Callable[..., torch.Tensor]] = {
    "box": box,
    "cross": cross,
    "diamond": diamond,
    "ball": ball,
}


@given(
    sizes=odd_kernel_sizes(),
    name=st.sampled_from(sorted(SYMMETRIC)),
    radius=st.floats(0, 3),
)
def test_unchanged_by_flips(sizes: tuple[int, ...], name: str, radius: float) -> None:
    options = {"radius": radius} if name in ("diamond", "ball") else {}
    mask = SYMMETRIC[name](sizes, **options)
    for axes in itertools.chain.from_iterable(
        itertools.combinations(range(len(sizes)), n) for n in range(1, len(sizes) + 1)
    ):
        assert torch.equal(mask.flip(axes), mask), axes


@given(sizes=odd_kernel_sizes(ndims=(2, 3)), data=st.data())
def test_anisotropic_ball_unchanged_by_flips(sizes: tuple[int, ...], data: st.DataObject) -> None:
    spacing = tuple(data.draw(st.floats(0.25, 4)) for _ in sizes)
    mask = ball(sizes, spacing=spacing)
    for axis in range(len(sizes)):
        assert torch.equal(mask.flip(axis), mask)


@given(
    k=st.sampled_from([1, 3, 5, 7]),
    ndim=st.sampled_from([2, 3]),
    name=st.sampled_from(sorted(SYMMETRIC)),
    radius=st.floats(0, 4),
)
def test_cubic_unchanged_by_axis_permutations(k: int, ndim: int, name: str, radius: float) -> None:
    options = {"radius": radius} if name in ("diamond", "ball") else {}
    mask = SYMMETRIC[name](k, ndim=ndim, **options)
    for perm in itertools.permutations(range(ndim)):
        assert torch.equal(mask.permute(perm), mask), perm


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_hexagonal_symmetries(k: int) -> None:
    mask = hexagonal(k)
    assert torch.equal(mask.flip((0, 1)), mask)  # point reflection
    assert torch.equal(mask.T, mask)  # swapping the axial axes
    assert not torch.equal(mask.flip(0), mask) or k == 1  # not symmetric under one flip
    # a 60-degree turn of the hex grid, (a, b) -> (-b, a + b) in axial offsets, maps the
    # kernel onto itself
    c = k // 2
    taps = {(i - c, j - c) for i, j in mask.nonzero().tolist()}
    assert {(-b, a + b) for a, b in taps} == taps


# -- checkerboard -----------------------------------------------------------------------------


def compressai_checkerboard_5x5() -> torch.Tensor:
    """CompressAI's CheckerboardMaskedConv2d mask, built as its constructor builds it."""
    mask = torch.zeros(1, 1, 5, 5)
    mask[:, :, 0::2, 1::2] = 1
    mask[:, :, 1::2, 0::2] = 1
    return mask[0, 0].bool()


def test_checkerboard_is_compressai_s_5x5_mask() -> None:
    assert torch.equal(checkerboard(5, ndim=2), compressai_checkerboard_5x5())
    assert torch.equal(checkerboard((5, 5)), compressai_checkerboard_5x5())
    assert int(checkerboard(5, ndim=2).sum()) == 12


@pytest.mark.parametrize(
    ("sizes", "taps"),
    [
        ((1,), 0),
        ((3,), 2),
        ((3, 3), 4),
        ((5, 5), 12),
        ((3, 3, 3), 14),
        ((5, 5, 5), 62),
        ((1, 3), 2),
    ],
)
def test_checkerboard_counts(sizes: tuple[int, ...], taps: int) -> None:
    assert int(checkerboard(sizes).sum()) == taps


@given(sizes=odd_kernel_sizes(ndims=(1, 2, 3, 4)))
def test_checkerboard_keeps_the_taps_whose_offsets_sum_to_an_odd_number(
    sizes: tuple[int, ...],
) -> None:
    mask = checkerboard(sizes)
    assert torch.equal(mask, by_rule(sizes, lambda o: sum(o) % 2 == 1))
    assert mask.shape == sizes
    assert mask.dtype == torch.bool
    # Half of the taps but one: sum over offsets of (-1) ** sum(o) is the product over axes
    # of (-1) ** (k // 2), so the odd taps number (numel - that product) / 2.
    sign = math.prod((-1) ** (k // 2) for k in sizes)
    assert int(mask.sum()) == (mask.numel() - sign) // 2
    assert not bool(mask[tuple(k // 2 for k in sizes)])  # never the centre


@given(sizes=odd_kernel_sizes(ndims=(1, 2, 3)))
def test_checkerboard_neighbours_along_an_axis_alternate(sizes: tuple[int, ...]) -> None:
    mask = checkerboard(sizes)
    for axis, k in enumerate(sizes):
        if k > 1:
            front = mask.narrow(axis, 0, k - 1)
            back = mask.narrow(axis, 1, k - 1)
            assert torch.equal(front, ~back)
    assert torch.equal(mask, mask.flip(tuple(range(len(sizes)))))  # point symmetric


def test_checkerboard_anchors_feed_the_non_anchors_only() -> None:
    # One layer of the checkerboard context model: anchors (even parity positions of the
    # image) feed the outputs at non-anchors; a change at a non-anchor reaches no output at
    # a non-anchor.
    conv = apply_mask(nn.Conv2d(1, 1, 5, padding=2, bias=False), checkerboard(5, ndim=2))
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 1.0  # (3 + 4) odd: a non-anchor
    with torch.no_grad():
        out = conv(x)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert bool((out[(rows + cols) % 2 == 1] == 0).all())


def test_checkerboard_is_a_fresh_cpu_bool_tensor() -> None:
    first = checkerboard(3, ndim=2)
    assert (first.dtype, first.device.type) == (torch.bool, "cpu")
    first.fill_(True)
    assert int(checkerboard(3, ndim=2).sum()) == 4


@pytest.mark.parametrize(
    ("kernel_size", "ndim", "error", "match"),
    [
        (
            (5, 4),
            None,
            ValueError,
            r"checkerboard needs an odd kernel size along every axis, so that the kernel has a "
            r"centre tap\. Got kernel_size=\(5, 4\)",
        ),
        (4, 2, ValueError, r"checkerboard needs an odd kernel size .*Got kernel_size=\(4, 4\)"),
        (5, None, ValueError, r"checkerboard needs ndim when kernel_size is an int: pass "),
        (5.0, 2, TypeError, r"checkerboard expects kernel_size as an int or a tuple of ints"),
        (5, 0, ValueError, r"checkerboard expects ndim to be at least 1\. Got ndim=0"),
        ((5, 5), 3, ValueError, r"checkerboard expects ndim to match the number of kernel"),
    ],
)
def test_exception_checkerboard(
    kernel_size: Any, ndim: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        checkerboard(kernel_size, ndim)


# -- pure functions ---------------------------------------------------------------------------

EVERY_FACTORY: dict[str, Callable[[], torch.Tensor]] = {
    "box": lambda: box(3, ndim=2),
    "cross": lambda: cross(3, ndim=2),
    "diamond": lambda: diamond(3, ndim=2),
    "ball": lambda: ball(3, ndim=2),
    "hexagonal": lambda: hexagonal(3),
    "causal": lambda: causal(3, ndim=2),
    "causal-channels": lambda: causal(3, ndim=2, in_channels=3, out_channels=3),
    "dilated": lambda: dilated(2, 2, ndim=2),
    "blind_spot": lambda: blind_spot(3, ndim=2),
    "line": lambda: line(3, 0, ndim=2),
    "random": lambda: random((3, 3), 0.5),
    "from_text": lambda: from_text("#.#"),
}


@pytest.mark.parametrize("name", sorted(EVERY_FACTORY))
def test_factories_return_fresh_cpu_bool_tensors(name: str) -> None:
    torch.manual_seed(0)
    first = EVERY_FACTORY[name]()
    assert first.dtype == torch.bool
    assert first.device.type == "cpu"
    kept = first.clone()
    first.fill_(True)  # changing one result changes no later one
    torch.manual_seed(0)
    assert torch.equal(EVERY_FACTORY[name](), kept)


def test_smoke_with_apply_mask() -> None:
    conv = apply_mask(nn.Conv3d(2, 4, 3, padding=1), cross(3, ndim=3))
    assert int((conv.weight[0, 0] != 0).sum()) == 7
