"""The shapes around a centre: masks defined by each tap's offset from the kernel's centre.

See :mod:`maskparam.masks` for the arguments, results and errors the shapes share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from maskparam.masks import _args
from maskparam.masks.text import to_text  # noqa: F401  (the examples draw with it)

__all__ = ["ball", "blind_spot", "checkerboard", "cross", "diamond", "hexagonal", "line"]


# Distances within this relative margin of the radius count as inside, so that
# radius=math.sqrt(3) keeps the corners of a 3x3x3 kernel although sqrt(3) ** 2 < 3 in floats.
_RTOL = 1e-9


def _offsets(sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """One int64 grid per axis holding each tap's offset from the centre along that axis."""
    axes = [torch.arange(k) - k // 2 for k in sizes]
    return tuple(torch.meshgrid(*axes, indexing="ij"))


def _inside(distance: Tensor, radius: float) -> Tensor:
    return distance <= radius * (1 + _RTOL)


def cross(kernel_size: int | Sequence[int], ndim: int | None = None) -> Tensor:
    """The taps with at most one non-zero offset: a "plus" (MinkowskiEngine's HYPER_CROSS).

    A 3x3x3 cross has 7 taps (the centre and its six face neighbours), a 5x5 cross has 9.

    Example:
        >>> print(to_text(cross(5, ndim=2)))
        ..#..
        ..#..
        #####
        ..#..
        ..#..
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "cross")
    _args.check_odd(sizes, "cross")
    nonzero = sum((o != 0).long() for o in _offsets(sizes))
    assert isinstance(nonzero, Tensor)
    return nonzero <= 1


def diamond(
    kernel_size: int | Sequence[int], ndim: int | None = None, radius: float | None = None
) -> Tensor:
    """The L1 ball: taps whose offsets satisfy ``sum(|o|) <= radius``.

    A 5x5 diamond of radius 2 has 13 taps. Where the diamond is wider than the kernel, the
    kernel's edge cuts it off.

    Args:
        kernel_size: The kernel's size, odd along every axis.
        ndim: The number of spatial dims, for an int ``kernel_size``.
        radius: The L1 radius. Defaults to the largest half-size ``max(kernel_size) // 2``:
            the diamond reaches the kernel's edge along its longest axis (every edge, for a
            cubic kernel).

    Example:
        >>> print(to_text(diamond(5, ndim=2)))
        ..#..
        .###.
        #####
        .###.
        ..#..
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "diamond")
    _args.check_odd(sizes, "diamond")
    r = max(sizes) // 2 if radius is None else _args.as_radius(radius, "diamond")
    distance = sum(o.abs() for o in _offsets(sizes))
    assert isinstance(distance, Tensor)
    return _inside(distance.double(), r)


def _spacing(spacing: object, ndim: int) -> tuple[float, ...]:
    one = _args.as_float(spacing)
    several = _args.as_floats(spacing)
    if one is not None:
        values: tuple[float, ...] = (one,) * ndim
    elif several is not None:
        values = several
        if len(values) != ndim:
            raise ValueError(
                f"ball expects one spacing per axis ({ndim} for this kernel). "
                f"Got spacing={values}."
            )
    else:
        raise TypeError(
            f"ball expects spacing as a number or a tuple of numbers. Got {spacing!r}."
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"ball expects every spacing to be finite and greater than 0. Got spacing={values}."
        )
    return values


def ball(
    kernel_size: int | Sequence[int],
    ndim: int | None = None,
    radius: float | None = None,
    spacing: float | Sequence[float] | None = None,
) -> Tensor:
    """The L2 ball: taps whose offsets satisfy ``sum((o * spacing) ** 2) <= radius ** 2``.

    With ``spacing``, distances are physical rather than in voxels, for anisotropic scans (a
    CT volume with 2.5 mm slices and 0.7 mm pixels has ``spacing=(2.5, 0.7, 0.7)``). A
    3x3x3 ball has 7, 19 or 27 taps for ``radius ** 2`` = 1, 2 or 3; a 5x5x5 ball of radius 2
    has 33.

    Args:
        kernel_size: The kernel's size, odd along every axis.
        ndim: The number of spatial dims, for an int ``kernel_size``.
        radius: The radius, in the units of ``spacing``. Defaults to the largest physical
            half-size ``max((kernel_size // 2) * spacing)``: the ball reaches the kernel's
            edge along the axis where the kernel is physically longest. Without ``spacing``
            that is ``max(kernel_size) // 2``, so a 3x3x3 ball defaults to the 7-tap cross.
        spacing: The distance between neighbouring taps along each axis, a number or one per
            axis. Defaults to 1 along every axis.

    Raises:
        ValueError: If a spacing is not finite and positive, or not one per axis.

    Example:
        >>> print(to_text(ball(5, ndim=2)))
        ..#..
        .###.
        #####
        .###.
        ..#..
        >>> print(to_text(ball((3, 5), spacing=(2.0, 1.0), radius=2)))
        ..#..
        #####
        ..#..
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "ball")
    _args.check_odd(sizes, "ball")
    scale = _spacing(1.0 if spacing is None else spacing, len(sizes))
    if radius is None:
        r = max(k // 2 * s for k, s in zip(sizes, scale, strict=True))
    else:
        r = _args.as_radius(radius, "ball")
    distance2 = sum((o.double() * s) ** 2 for o, s in zip(_offsets(sizes), scale, strict=True))
    assert isinstance(distance2, Tensor)
    return _inside(distance2, r * r)


def hexagonal(kernel_size: int | Sequence[int]) -> Tensor:
    """A 2-D hexagon stored in axial layout, as in HexaConv: keep ``|a + b| <= k // 2``.

    Layout: a hexagonal grid of pointy-top cells in axial coordinates. Axis 0 is the axial
    row ``r`` and axis 1 the axial column ``q``, so cell ``(r, q)`` sits at ``x = q + r / 2``
    and each row lies half a cell to the right of the row above. The six neighbours of the
    centre are then at offsets ``(0, ±1)``, ``(±1, 0)``, ``(1, -1)`` and ``(-1, 1)``, and
    the kernel keeps every cell within hex distance ``max(|a|, |b|, |a + b|) <= k // 2``:
    the square with the two corners where ``a`` and ``b`` share a sign cut off. A 3x3 kernel
    has 7 taps, a 5x5 kernel 19.

    Args:
        kernel_size: An odd int ``k``, or a square ``(k, k)``.

    Returns:
        A bool tensor of shape ``(k, k)``.

    Raises:
        ValueError: If the kernel is not square and 2-D.

    Example:
        >>> print(to_text(hexagonal(5)))
        ..###
        .####
        #####
        ####.
        ###..
    """
    k = _args.as_int(kernel_size)
    sizes = _args.kernel_sizes((k, k) if k is not None else kernel_size, None, "hexagonal")
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(
            f"hexagonal needs a square 2-D kernel, an int k or (k, k). Got kernel_size={sizes}."
        )
    _args.check_odd(sizes, "hexagonal")
    a, b = _offsets(sizes)
    return (a + b).abs() <= sizes[0] // 2


def blind_spot(
    kernel_size: int | Sequence[int], ndim: int | None = None, radius: float = 0
) -> Tensor:
    """Every tap but the centre, or but a small ball around it (Noise2Void-style).

    Self-supervised denoisers learn to predict a pixel from its neighbours only; a kernel
    that never sees its own centre cannot learn the identity.

    Args:
        kernel_size: The kernel's size, odd along every axis.
        ndim: The number of spatial dims, for an int ``kernel_size``.
        radius: Taps within this L2 distance of the centre are switched off: 0 removes the
            centre only, 1 the centre and its face neighbours. The same ``1e-9`` margin as
            :func:`ball` applies.

    Example:
        >>> print(to_text(blind_spot(3, ndim=2)))
        ###
        #.#
        ###
        >>> print(to_text(blind_spot(5, ndim=2, radius=1)))  # doctest: -ELLIPSIS
        #####
        ##.##
        #...#
        ##.##
        #####
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "blind_spot")
    _args.check_odd(sizes, "blind_spot")
    r = _args.as_radius(radius, "blind_spot")
    distance2 = sum(o.double() ** 2 for o in _offsets(sizes))
    assert isinstance(distance2, Tensor)
    return ~_inside(distance2, r * r)


def checkerboard(kernel_size: int | Sequence[int], ndim: int | None = None) -> Tensor:
    """The taps whose offsets from the centre sum to an odd number: a checkerboard.

    The context model of the checkerboard entropy model (He et al., "Checkerboard Context
    Model for Efficient Learned Image Compression", CVPR 2021): the anchors, decoded first,
    sit where the offsets sum to an odd number, so a non-anchor at the centre sees only
    them. For a 5x5 kernel this is CompressAI's ``CheckerboardMaskedConv2d`` mask,
    ``mask[:, :, 0::2, 1::2] = 1; mask[:, :, 1::2, 0::2] = 1``. The centre is always off,
    and so are half of the other taps: a 5x5 checkerboard has 12 taps, a 3x3x3 one 14.

    Example:
        >>> print(to_text(checkerboard(5, ndim=2)))
        .#.#.
        #.#.#
        .#.#.
        #.#.#
        .#.#.
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "checkerboard")
    _args.check_odd(sizes, "checkerboard")
    total = sum(_offsets(sizes))
    assert isinstance(total, Tensor)
    return total.remainder(2) == 1


def line(kernel_size: int | Sequence[int], axis: int, ndim: int | None = None) -> Tensor:
    """The taps along one axis through the centre: a 1-D kernel inside an N-D one.

    Args:
        kernel_size: The kernel's size, an int for every axis or one int per axis. Sizes
            must be odd on every axis but ``axis``.
        axis: The axis the line runs along; negative values count from the end.
        ndim: The number of spatial dims, for an int ``kernel_size``.

    Raises:
        ValueError: If ``axis`` is out of range.

    Example:
        >>> print(to_text(line(3, axis=0, ndim=2)))
        .#.
        .#.
        .#.
        >>> print(to_text(line((1, 5), axis=-1)))
        #####
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "line")
    a = _args.as_int(axis)
    if a is None:
        raise TypeError(f"line expects axis as an int. Got {axis!r}.")
    n = len(sizes)
    if not -n <= a < n:
        raise ValueError(
            f"line expects an axis in [{-n}, {n - 1}] for a {n}-D kernel. Got axis={axis}."
        )
    a %= n
    if any(k % 2 == 0 for i, k in enumerate(sizes) if i != a):
        raise ValueError(
            f"line needs an odd kernel size on every axis but axis={a}, so that the line "
            f"runs through the centre. Got kernel_size={sizes}."
        )
    keep = torch.ones(sizes, dtype=torch.bool)
    for i, o in enumerate(_offsets(sizes)):
        if i != a:
            keep &= o == 0
    return keep
