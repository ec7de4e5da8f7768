"""Every mask factory's errors: the rule, and what it got."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from maskparam.masks import (
    ball,
    blind_spot,
    box,
    causal,
    cross,
    diamond,
    dilated,
    hexagonal,
    line,
    random,
)

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
