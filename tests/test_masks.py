from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskparam.apply import apply_mask, get_mask
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
    to_text,
)
from tests.strategies import CONV, bool_masks, odd_kernel_sizes

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def offsets(sizes: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every (index, offset) pair of a kernel, offset = index - size // 2, in raster order."""
    for index in itertools.product(*(range(k) for k in sizes)):
        yield index, tuple(i - k // 2 for i, k in zip(index, sizes, strict=True))


def by_rule(sizes: tuple[int, ...], rule: Callable[[tuple[int, ...]], bool]) -> torch.Tensor:
    """The mask that keeps the taps whose offset satisfies ``rule``, built one tap at a time."""
    mask = torch.zeros(sizes, dtype=torch.bool)
    for index, o in offsets(sizes):
        mask[index] = rule(o)
    return mask


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
def test_tap_counts_from_the_issue(make: Callable[[], torch.Tensor], taps: int) -> None:
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


# -- causal -----------------------------------------------------------------------------------


@given(sizes=odd_kernel_sizes(ndims=(1, 2, 3, 4)))
def test_causal_is_lexicographic_order(sizes: tuple[int, ...]) -> None:
    centre = (0,) * len(sizes)
    a, b = causal(sizes, kind="A"), causal(sizes, kind="B")
    assert torch.equal(a, by_rule(sizes, lambda o: o < centre))
    assert torch.equal(b, by_rule(sizes, lambda o: o <= centre))
    assert int(a.sum()) == math.prod(sizes) // 2
    assert int((b & ~a).sum()) == 1


def _stack(ndim: int, masks: list[torch.Tensor], channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for mask, c_in, c_out in zip(masks, channels, channels[1:], strict=False):
        conv = CONV[ndim](c_in, c_out, 3, padding=1, dtype=torch.float64)
        layers += [apply_mask(conv, mask), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _grad_at(
    net: nn.Module, x: torch.Tensor, channels: slice, where: tuple[int, ...]
) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = net(x)
    (grad,) = torch.autograd.grad(y[(0, channels, *where)].sum(), x)
    return grad[0]


@pytest.mark.parametrize(("ndim", "side"), [(1, 9), (2, 5), (3, 4)])
def test_causal_stack_never_sees_the_present_or_the_future(ndim: int, side: int) -> None:
    masks = [causal(3, ndim=ndim, kind="A")] + [causal(3, ndim=ndim, kind="B")] * 2
    net = _stack(ndim, masks, [2, 4, 4, 2])
    x = torch.randn(1, 2, *(side,) * ndim, dtype=torch.float64)
    for flat, where in enumerate(itertools.product(range(side), repeat=ndim)):
        seen = _grad_at(net, x, slice(None), where).abs().sum(0).flatten()
        assert bool((seen[flat:] == 0).all()), where  # that position and every later one
        if where[-1] > 0:
            assert seen[flat - 1] != 0, where  # the previous tap in its row is seen


@pytest.mark.parametrize("interleaved", [False, True], ids=["contiguous", "interleaved"])
def test_causal_channel_groups_through_a_stack(interleaved: bool) -> None:
    def mask(kind: Literal["A", "B"], c_in: int, c_out: int) -> torch.Tensor:
        return causal(
            3, ndim=2, kind=kind, in_channels=c_in, out_channels=c_out, interleaved=interleaved
        )

    net = _stack(2, [mask("A", 3, 6), mask("B", 6, 6), mask("B", 6, 3)], [3, 6, 6, 3])
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    for where in [(0, 0), (2, 2), (4, 3)]:
        flat = where[0] * 5 + where[1]
        for g in range(3):  # output channel g is colour group g
            grad = _grad_at(net, x, slice(g, g + 1), where)
            later = grad.flatten(1)[:, flat + 1 :]
            assert bool((later == 0).all())
            here = grad[(slice(None), *where)]
            assert bool((here[g:] == 0).all()), (where, g)  # not its own group, nor later
            assert bool((here[:g] != 0).all()), (where, g)  # but the earlier groups


@pytest.mark.parametrize("kind", ["A", "B"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["contiguous", "interleaved"])
def test_causal_channel_group_layout(kind: Literal["A", "B"], interleaved: bool) -> None:
    full = causal((3, 3), kind=kind, in_channels=6, out_channels=3, interleaved=interleaved)
    assert full.shape == (3, 6, 3, 3)
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    spatial = causal((3, 3), kind="A")[off_centre]  # every pair: the type-A taps off the centre
    assert torch.equal(full[:, :, off_centre], spatial.expand(3, 6, -1))
    group_in = [c % 3 for c in range(6)] if interleaved else [c // 2 for c in range(6)]
    for o, i in itertools.product(range(3), range(6)):
        sees = group_in[i] < o or (kind == "B" and group_in[i] == o)
        assert bool(full[o, i, 1, 1]) == sees, (o, i)


def test_causal_channel_groups_option() -> None:
    full = causal(1, ndim=1, kind="B", in_channels=4, out_channels=4, channel_groups=2)
    assert full[:, :, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    one = causal(3, ndim=2, kind="B", in_channels=2, out_channels=2, channel_groups=1)
    assert torch.equal(one, causal(3, ndim=2, kind="B").expand(2, 2, 3, 3))


def test_causal_channel_form_fits_apply_mask() -> None:
    mask = causal(5, ndim=2, in_channels=3, out_channels=6)
    conv = apply_mask(nn.Conv2d(3, 6, 5), mask)
    assert torch.equal(get_mask(conv), mask)


# -- dilated ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "dilation", "padding", "stride"),
    [
        ((3,), 2, 0, 1),
        ((2, 3), (2, 3), 1, 1),
        ((3, 3), 1, 1, 2),
        ((4, 3), 3, 2, (1, 2)),
        ((3, 2, 2), (1, 2, 3), 1, 1),
    ],
)
def test_dilated_conv_equals_dilation_exactly(
    kernel: tuple[int, ...],
    dilation: int | tuple[int, ...],
    padding: int,
    stride: int | tuple[int, ...],
) -> None:
    ndim = len(kernel)
    mask = dilated(kernel, dilation)
    d = (dilation,) * ndim if isinstance(dilation, int) else dilation
    assert mask.shape == tuple((k - 1) * s + 1 for k, s in zip(kernel, d, strict=True))
    assert int(mask.sum()) == math.prod(kernel)
    # Small integers: every sum is exact, so any order of summation gives the same bits.
    w = torch.randint(-3, 4, (2, 3, *kernel)).double()
    x = torch.randint(-3, 4, (2, 3, *(9,) * ndim)).double()
    layer = CONV[ndim](3, 2, tuple(mask.shape), stride=stride, padding=padding, bias=False)
    conv = apply_mask(layer, mask)
    conv = conv.double()
    spread = torch.zeros(2, 3, *mask.shape, dtype=torch.float64)
    spread[:, :, mask] = w.flatten(2)  # the kept taps, in raster order, are the kernel's taps
    conv.weight = spread
    expected = CONV_FN[ndim](x, w, stride=stride, padding=padding, dilation=dilation)
    assert torch.equal(conv(x), expected)


def test_dilated_with_dilation_one_is_a_box() -> None:
    assert torch.equal(dilated(3, 1, ndim=2), box(3, ndim=2))


# -- random -----------------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_random_hits_the_exact_count(shape: tuple[int, ...], density: float, seed: int) -> None:
    mask = random(shape, density, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == shape
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == round(density * math.prod(shape))


def test_random_rounds_halves_to_even() -> None:
    assert int(random(10, 0.25).sum()) == 2  # round(2.5) == 2
    assert int(random(10, 0.35).sum()) == round(3.5) == 4
    assert int(random((3, 3), 0.0).sum()) == 0
    assert bool(random((3, 3), 1.0).all())


def test_random_is_reproducible() -> None:
    def draw(seed: int) -> torch.Tensor:
        return random((8, 8), 0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    torch.manual_seed(7)
    first = random((8, 8), 0.5)
    torch.manual_seed(7)
    assert torch.equal(random((8, 8), 0.5), first)  # the global generator, when none is given


# -- text form --------------------------------------------------------------------------------


@given(mask=bool_masks())
def test_text_round_trip(mask: torch.Tensor) -> None:
    text = to_text(mask)
    assert set(text) <= {"#", ".", "\n"}
    assert torch.equal(from_text(text, ndim=mask.dim()), mask)
    # Without ndim, leading sizes of 1 are not in the text: (1, 1, 3) reads back as (3,).
    shape = list(mask.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    assert torch.equal(from_text(text), mask.reshape(shape))
    if mask.shape[0] > 1:
        assert torch.equal(from_text(text), mask)


def test_text_layout() -> None:
    mask = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert to_text(mask) == "#.\n..\n\n.#\n##"
    assert to_text(mask[1]) == ".#\n##"
    assert to_text(mask[1, 1]) == "##"
    assert to_text(torch.tensor([0, 1, 1])) == ".##"  # 0/1 numbers are fine


def test_from_text_is_lenient_about_whitespace() -> None:
    text = """

        #.
        ..


        .#
        ##

    """
    expected = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    assert torch.equal(from_text(text), expected)
    assert from_text("  .#.  ").shape == (3,)


def test_from_text_ndim_adds_leading_axes() -> None:
    assert from_text("#.#", ndim=3).shape == (1, 1, 3)
    assert from_text("#.\n.#", ndim=3).shape == (1, 2, 2)
    assert from_text("#.\n.#\n\n..\n..", ndim=3).shape == (2, 2, 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("#.#\n#x#", r"'#' \(active\) and '\.' \(off\) only\. Got 'x' at line 2, column 2"),
        ("#.# #", r"Got ' ' at line 1, column 4"),
        ("1 0 1", r"Got '1' at line 1, column 1"),
        ("#.#\n##", r"rows of equal length\. Got 3 characters at line 1 and 2 at line 2"),
        (
            "#.\n\n.#\n##",
            r"slices .* of equal height\. Got 1 rows .* and 2 in the block at line 3",
        ),
        ("", "at least one row"),
        ("\n  \n", "at least one row"),
    ],
)
def test_from_text_exception(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_text(text)


def test_from_text_ndim_exception() -> None:
    with pytest.raises(ValueError, match=r"from_text\(ndim=1\) expects text of at most 1 dims"):
        from_text("#.\n.#", ndim=1)
    with pytest.raises(ValueError, match=r"at most 2 dims\. Got 2 slices"):
        from_text("#\n\n.", ndim=2)
    for ndim in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match="ndim to be 1, 2, 3 or None"):
            from_text("#", ndim=ndim)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"from_text expects the mask as a str\. Got bytes"):
        from_text(b"#.#")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.tensor(True), ValueError, r"1 to 3 dims.*Got shape=\(\)"),
        (torch.ones(1, 1, 1, 1, dtype=torch.bool), ValueError, r"Got shape=\(1, 1, 1, 1\)"),
        (torch.ones(2, 0, dtype=torch.bool), ValueError, r"at least 1\. Got shape=\(2, 0\)"),
        (torch.tensor([0, 2]), ValueError, "values are all 0 or 1"),
        (object(), TypeError, "to_text expects the mask as a tensor"),
    ],
)
def test_to_text_exception(mask: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        to_text(mask)


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


# -- errors -----------------------------------------------------------------------------------

CENTRED = {
    "cross": cross,
    "diamond": diamond,
    "ball": ball,
    "causal": causal,
    "blind_spot": blind_spot,
}


@pytest.mark.parametrize("name", sorted(CENTRED))
def test_exception_even_size(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} needs an odd kernel size along every axis, so"):
        CENTRED[name]((3, 4))


@pytest.mark.parametrize("make", [box, cross, diamond, ball, causal, blind_spot])
def test_exception_int_size_without_ndim(make: Callable[..., torch.Tensor]) -> None:
    name = make.__name__
    with pytest.raises(ValueError, match=rf"{name} needs ndim when kernel_size is an int: pass "):
        make(3)


@pytest.mark.parametrize(
    ("kernel_size", "ndim", "error", "match"),
    [
        (3, 0, ValueError, r"ndim to be at least 1\. Got ndim=0"),
        (3, True, TypeError, r"ndim, the number of spatial dims, as an int\. Got ndim=True"),
        (3, 2.0, TypeError, r"Got ndim=2\.0"),
        (3.0, 2, TypeError, r"kernel_size as an int or a tuple of ints\. Got 3\.0"),
        ("3", None, TypeError, r"Got '3'"),
        ((3, 3.0), None, TypeError, r"Got \(3, 3\.0\)"),
        (True, 2, TypeError, r"Got True"),
        ((), None, ValueError, r"at least one kernel size"),
        ((3, 3), 3, ValueError, r"ndim to match the number of kernel sizes\. Got kernel_size"),
        (
            (3, 0),
            None,
            ValueError,
            r"every kernel size to be at least 1\. Got kernel_size=\(3, 0\)",
        ),
        (-1, 2, ValueError, r"Got kernel_size=\(-1, -1\)"),
    ],
)
def test_exception_kernel_size(
    kernel_size: Any, ndim: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        box(kernel_size, ndim)
    with pytest.raises(error, match=match):
        line(kernel_size, 0, ndim)


@pytest.mark.parametrize("make", [diamond, ball, blind_spot])
@pytest.mark.parametrize(
    ("radius", "error", "match"),
    [
        ("2", TypeError, r"radius as a number\. Got '2'"),
        (True, TypeError, r"Got True"),
        (-1, ValueError, r"finite radius of at least 0\. Got radius=-1"),
        (math.nan, ValueError, r"Got radius=nan"),
        (math.inf, ValueError, r"Got radius=inf"),
    ],
)
def test_exception_radius(
    make: Callable[..., torch.Tensor], radius: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=rf"{make.__name__} expects .*{match}"):
        make(3, 2, radius)


@pytest.mark.parametrize(
    ("spacing", "error", "match"),
    [
        (
            (1.0,),
            ValueError,
            r"one spacing per axis \(2 for this kernel\)\. Got spacing=\(1\.0,\)",
        ),
        ("1,1", TypeError, r"spacing as a number or a tuple of numbers\. Got '1,1'"),
        ((1, None), TypeError, r"Got \(1, None\)"),
        ((1, 0), ValueError, r"finite and greater than 0\. Got spacing=\(1\.0, 0\.0\)"),
        (-2, ValueError, r"Got spacing=\(-2\.0, -2\.0\)"),
        ((1, math.inf), ValueError, r"Got spacing=\(1\.0, inf\)"),
    ],
)
def test_exception_spacing(spacing: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"ball expects .*{match}"):
        ball(3, ndim=2, spacing=spacing)


@pytest.mark.parametrize(
    ("kernel_size", "match"),
    [
        ((3, 5), r"square 2-D kernel, an int k or \(k, k\)\. Got kernel_size=\(3, 5\)"),
        ((3, 3, 3), r"Got kernel_size=\(3, 3, 3\)"),
        (4, r"hexagonal needs an odd kernel size"),
    ],
)
def test_exception_hexagonal(kernel_size: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hexagonal(kernel_size)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"kind": "C"}, ValueError, r'kind="A" or kind="B"\. Got kind=\'C\''),
        ({"kind": "a"}, ValueError, r"Got kind='a'"),
        ({"in_channels": 3}, ValueError, r"needs both in_channels and out_channels\. Got "),
        ({"out_channels": 3}, ValueError, r"Got in_channels=None and out_channels=3"),
        ({"channel_groups": 3}, ValueError, r"apply only to the channel-group form: pass"),
        ({"interleaved": True}, ValueError, r"Got channel_groups=None and interleaved=True"),
        ({"interleaved": 1}, TypeError, r"interleaved as a bool\. Got 1"),
        (
            {"in_channels": 4, "out_channels": 3},
            ValueError,
            r"in_channels to be a multiple of channel_groups, .* Got in_channels=4 and "
            r"channel_groups=3",
        ),
        (
            {"in_channels": 3, "out_channels": 6, "channel_groups": 4},
            ValueError,
            r"Got in_channels=3 and channel_groups=4",
        ),
        ({"in_channels": 3, "out_channels": 3.0}, TypeError, r"out_channels as an int\. Got 3\.0"),
        ({"in_channels": 0, "out_channels": 3}, ValueError, r"in_channels to be at least 1\. Got"),
        (
            {"in_channels": 3, "out_channels": 3, "channel_groups": 0},
            ValueError,
            r"channel_groups to be at least 1\. Got channel_groups=0",
        ),
    ],
)
def test_exception_causal(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"causal\W.*{match}"):
        causal(3, ndim=2, **options)


@pytest.mark.parametrize(
    ("dilation", "error", "match"),
    [
        (2.0, TypeError, r"dilation as an int or a tuple of ints\. Got 2\.0"),
        (
            (2, 2, 2),
            ValueError,
            r"one dilation per axis of the kernel\. Got kernel_size=\(3, 3\) ",
        ),
        (0, ValueError, r"every dilation to be at least 1\. Got dilation=\(0, 0\)"),
        ((1, -1), ValueError, r"Got dilation=\(1, -1\)"),
    ],
)
def test_exception_dilated(dilation: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"dilated expects .*{match}"):
        dilated(3, dilation, ndim=2)


@pytest.mark.parametrize(
    ("kernel_size", "axis", "error", "match"),
    [
        ((3, 3), 2, ValueError, r"an axis in \[-2, 1\] for a 2-D kernel\. Got axis=2"),
        ((3, 3), -3, ValueError, r"Got axis=-3"),
        ((3, 3), 1.0, TypeError, r"axis as an int\. Got 1\.0"),
        ((4, 3), 1, ValueError, r"odd kernel size on every axis but axis=1.* Got kernel_size"),
        ((3, 4), -2, ValueError, r"but axis=0, so that the line runs through the centre"),
    ],
)
def test_exception_line(kernel_size: Any, axis: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"line (expects|needs) .*{match}"):
        line(kernel_size, axis)


@pytest.mark.parametrize(
    ("shape", "density", "generator", "error", "match"),
    [
        ("3", 0.5, None, TypeError, r"shape as an int or a tuple of ints\. Got '3'"),
        ((3, 0), 0.5, None, ValueError, r"every size to be at least 1\. Got shape=\(3, 0\)"),
        (3, "0.5", None, TypeError, r"density as a number\. Got '0\.5'"),
        (3, 1.5, None, ValueError, r"density in \[0, 1\]\. Got density=1\.5"),
        (3, -0.1, None, ValueError, r"Got density=-0\.1"),
        (3, math.nan, None, ValueError, r"Got density=nan"),
        (3, 0.5, 0, TypeError, r"generator as a torch\.Generator or None\. Got <class 'int'>"),
    ],
)
def test_exception_random(
    shape: Any, density: Any, generator: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=rf"random expects .*{match}"):
        random(shape, density, generator=generator)


@pytest.mark.cuda
def test_random_with_a_cuda_generator() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    mask = random((5, 7), 0.4, generator=generator)
    assert mask.device.type == "cpu"
    assert int(mask.sum()) == 14
    again = random((5, 7), 0.4, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(mask, again)
    conv = apply_mask(nn.Conv2d(2, 3, 5, device="cuda"), ball(5, ndim=2))
    assert int((conv.weight[0, 0] != 0).sum().item()) == 13


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
