"""Named kernel masks as boolean tensors, and a readable text form for them.

Every factory is a pure function that returns a new CPU ``torch.bool`` tensor (True keeps a
tap), ready for :func:`~maskparam.apply_mask`. Offsets from the centre are
``o = index - size // 2`` along each axis.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from maskparam import _checks

__all__ = [
    "ball",
    "blind_spot",
    "box",
    "causal",
    "checkerboard",
    "cross",
    "diamond",
    "dilated",
    "from_text",
    "hexagonal",
    "line",
    "random",
    "to_text",
    "top_taps",
]

# Distances within this relative margin of the radius count as inside, so that
# radius=math.sqrt(3) keeps the corners of a 3x3x3 kernel although sqrt(3) ** 2 < 3 in floats.
_RTOL = 1e-9

_ON, _OFF = "#", "."


# -- argument checks ------------------------------------------------------------------------


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (NumPy's included, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a real number (NumPy's included, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _ints(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints if it is a non-string sequence of ints, else None."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [_as_int(v) for v in value]
        if all(i is not None for i in items):
            return tuple(i for i in items if i is not None)
    return None


def _floats(value: object) -> tuple[float, ...] | None:
    """``value`` as a tuple of floats if it is a non-string sequence of numbers, else None."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [_as_float(v) for v in value]
        if all(i is not None for i in items):
            return tuple(i for i in items if i is not None)
    return None


def _kernel_size(
    kernel_size: int | Sequence[int], ndim: int | None, caller: str
) -> tuple[int, ...]:
    """The kernel size as one int per axis, after checking it against ``ndim``."""
    if ndim is not None:
        if _as_int(ndim) is None:
            raise TypeError(
                f"{caller} expects ndim, the number of spatial dims, as an int. Got ndim={ndim!r}."
            )
        if ndim < 1:
            raise ValueError(f"{caller} expects ndim to be at least 1. Got ndim={ndim}.")
    k = _as_int(kernel_size)
    if k is not None:
        if ndim is None:
            raise ValueError(
                f"{caller} needs ndim when kernel_size is an int: pass ndim=2 for a {k}x{k} "
                f"kernel, or a tuple such as kernel_size=({k}, {k}). Got kernel_size={k} "
                "and no ndim."
            )
        sizes: tuple[int, ...] = (k,) * int(ndim)
    else:
        as_ints = _ints(kernel_size)
        if as_ints is None:
            raise TypeError(
                f"{caller} expects kernel_size as an int or a tuple of ints. Got {kernel_size!r}."
            )
        sizes = as_ints
        if not sizes:
            raise ValueError(f"{caller} expects at least one kernel size. Got kernel_size=().")
        if ndim is not None and ndim != len(sizes):
            raise ValueError(
                f"{caller} expects ndim to match the number of kernel sizes. "
                f"Got kernel_size={sizes} ({len(sizes)} sizes) and ndim={ndim}."
            )
    if any(k < 1 for k in sizes):
        raise ValueError(
            f"{caller} expects every kernel size to be at least 1. Got kernel_size={sizes}."
        )
    return sizes


def _check_odd(sizes: tuple[int, ...], caller: str) -> None:
    if any(k % 2 == 0 for k in sizes):
        raise ValueError(
            f"{caller} needs an odd kernel size along every axis, so that the kernel has a "
            f"centre tap. Got kernel_size={sizes}."
        )


def _radius(radius: object, caller: str) -> float:
    r = _as_float(radius)
    if r is None:
        raise TypeError(f"{caller} expects radius as a number. Got {radius!r}.")
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"{caller} expects a finite radius of at least 0. Got radius={radius}.")
    return r


def _offsets(sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """One int64 grid per axis holding each tap's offset from the centre along that axis."""
    axes = [torch.arange(k) - k // 2 for k in sizes]
    return tuple(torch.meshgrid(*axes, indexing="ij"))


def _inside(distance: Tensor, radius: float) -> Tensor:
    return distance <= radius * (1 + _RTOL)


# -- factories ------------------------------------------------------------------------------


def box(kernel_size: int | Sequence[int], ndim: int | None = None) -> Tensor:
    """Every tap: the mask of an ordinary dense kernel.

    Args:
        kernel_size: The kernel's size, an int for every axis or one int per axis. Even
            sizes are allowed.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.

    Returns:
        A bool tensor of shape ``kernel_size``, all True.

    Raises:
        TypeError: If ``kernel_size`` or ``ndim`` has another type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is below 1, or
            ``ndim`` disagrees with ``kernel_size``.

    Example:
        >>> print(to_text(box((2, 3))))
        ###
        ###
    """
    return torch.ones(_kernel_size(kernel_size, ndim, "box"), dtype=torch.bool)


def cross(kernel_size: int | Sequence[int], ndim: int | None = None) -> Tensor:
    """The taps with at most one non-zero offset: a "plus" (MinkowskiEngine's HYPER_CROSS).

    A 3x3x3 cross has 7 taps (the centre and its six face neighbours), a 5x5 cross has 9.

    Args:
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If ``kernel_size`` or ``ndim`` has another type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, or ``ndim`` disagrees with ``kernel_size``.

    Example:
        >>> print(to_text(cross(5, ndim=2)))
        ..#..
        ..#..
        #####
        ..#..
        ..#..
    """
    sizes = _kernel_size(kernel_size, ndim, "cross")
    _check_odd(sizes, "cross")
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
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.
        radius: The L1 radius. Defaults to the largest half-size ``max(kernel_size) // 2``:
            the diamond reaches the kernel's edge along its longest axis (every edge, for a
            cubic kernel).

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, ``ndim`` disagrees with ``kernel_size``, or ``radius`` is negative or not
            finite.

    Example:
        >>> print(to_text(diamond(5, ndim=2)))
        ..#..
        .###.
        #####
        .###.
        ..#..
    """
    sizes = _kernel_size(kernel_size, ndim, "diamond")
    _check_odd(sizes, "diamond")
    r = max(sizes) // 2 if radius is None else _radius(radius, "diamond")
    distance = sum(o.abs() for o in _offsets(sizes))
    assert isinstance(distance, Tensor)
    return _inside(distance.double(), r)


def _spacing(spacing: object, ndim: int) -> tuple[float, ...]:
    one = _as_float(spacing)
    several = _floats(spacing)
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
    has 33. Distances within a relative ``1e-9`` of the radius count as inside, so
    ``radius=math.sqrt(2)`` keeps the taps at distance sqrt(2).

    Args:
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.
        radius: The radius, in the units of ``spacing``. Defaults to the largest physical
            half-size ``max((kernel_size // 2) * spacing)``: the ball reaches the kernel's
            edge along the axis where the kernel is physically longest. Without ``spacing``
            that is ``max(kernel_size) // 2``, so a 3x3x3 ball defaults to the 7-tap cross.
        spacing: The distance between neighbouring taps along each axis, a number or one per
            axis. Defaults to 1 along every axis.

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, ``ndim`` disagrees with ``kernel_size``, ``radius`` is negative or not finite,
            or a spacing is not positive and finite or their count is not one per axis.

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
    sizes = _kernel_size(kernel_size, ndim, "ball")
    _check_odd(sizes, "ball")
    scale = _spacing(1.0 if spacing is None else spacing, len(sizes))
    if radius is None:
        r = max(k // 2 * s for k, s in zip(sizes, scale, strict=True))
    else:
        r = _radius(radius, "ball")
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
        TypeError: If ``kernel_size`` is neither an int nor a tuple of ints.
        ValueError: If the kernel is not square and 2-D, or ``k`` is even or below 1.

    Example:
        >>> print(to_text(hexagonal(5)))
        ..###
        .####
        #####
        ####.
        ###..
    """
    k = _as_int(kernel_size)
    sizes = _kernel_size((k, k) if k is not None else kernel_size, None, "hexagonal")
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(
            f"hexagonal needs a square 2-D kernel, an int k or (k, k). Got kernel_size={sizes}."
        )
    _check_odd(sizes, "hexagonal")
    a, b = _offsets(sizes)
    return (a + b).abs() <= sizes[0] // 2


def _positive_int(value: object, name: str) -> int:
    number = _as_int(value)
    if number is None:
        raise TypeError(f"causal expects {name} as an int. Got {value!r}.")
    if number < 1:
        raise ValueError(f"causal expects {name} to be at least 1. Got {name}={value}.")
    return number


def _channel_groups(channels: int, groups: int, interleaved: bool, name: str) -> Tensor:
    if channels % groups:
        raise ValueError(
            f"causal expects {name} to be a multiple of channel_groups, so that every group "
            f"has as many channels. Got {name}={channels} and channel_groups={groups}."
        )
    index = torch.arange(channels)
    return index % groups if interleaved else index // (channels // groups)


def causal(
    kernel_size: int | Sequence[int],
    ndim: int | None = None,
    kind: Literal["A", "B"] = "A",
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    channel_groups: int | None = None,
    interleaved: bool = False,
) -> Tensor:
    """The autoregressive mask of PixelCNN, in raster order, for any number of dims.

    Taps are ordered lexicographically by their offsets (row by row in 2-D, slice by slice in
    3-D). Type ``"A"``, for the first layer, keeps the taps strictly before the centre, so an
    output never sees the input at its own position. Type ``"B"``, for the layers after it,
    keeps the centre too. Stacked, an output still sees nothing at or after its position.

    Channel-group form: with ``in_channels`` and ``out_channels`` the result is the full
    ``(out_channels, in_channels, *kernel_size)`` mask for the layer's weight, for RGB-style
    models that predict the channels of a pixel one group after another. Channels are split
    into ``channel_groups`` groups (3 by default: R, G, B). All pairs of channels see every
    tap before the centre; at the centre, output group ``g`` sees the input groups ``< g``
    (type A) or ``<= g`` (type B). Groups are **contiguous blocks** by default: with 6
    channels, channels 0-1 are group 0, 2-3 group 1 and 4-5 group 2. With
    ``interleaved=True`` channel ``c`` is in group ``c % channel_groups`` instead
    (R, G, B, R, G, B).

    Args:
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.
        kind: ``"A"`` (centre excluded) or ``"B"`` (centre included).
        in_channels: The weight's input channels (``weight.shape[1]``), for the
            channel-group form; give ``out_channels`` with it.
        out_channels: The weight's output channels (``weight.shape[0]``), for the
            channel-group form; give ``in_channels`` with it.
        channel_groups: How many groups, in the channel-group form. Both channel counts
            must be multiples of it. Defaults to 3.
        interleaved: Channel-group form only: assign channels to groups in turn rather than
            in contiguous blocks.

    Returns:
        A bool tensor of shape ``kernel_size``, or ``(out_channels, in_channels,
        *kernel_size)`` in the channel-group form.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, ``ndim`` disagrees with ``kernel_size``, ``kind`` is neither "A" nor "B", only
            one channel count is given, a channel option is given without the channel counts, or a
            channel count is not a positive multiple of ``channel_groups``.

    Example:
        >>> print(to_text(causal(5, ndim=2, kind="A")))  # doctest: -ELLIPSIS
        #####
        #####
        ##...
        .....
        .....
        >>> print(to_text(causal(3, ndim=1, kind="B")))
        ##.
        >>> full = causal(3, ndim=2, kind="A", in_channels=3, out_channels=3)
        >>> full.shape
        torch.Size([3, 3, 3, 3])
        >>> full[:, :, 1, 1].int()  # at the centre, output group g sees input groups < g
        tensor([[0, 0, 0],
                [1, 0, 0],
                [1, 1, 0]], dtype=torch.int32)
        >>> print(to_text(full[1, 0]))  # doctest: -ELLIPSIS
        ###
        ##.
        ...
    """
    sizes = _kernel_size(kernel_size, ndim, "causal")
    _check_odd(sizes, "causal")
    if not isinstance(interleaved, bool):
        raise TypeError(f"causal expects interleaved as a bool. Got {interleaved!r}.")
    if kind not in ("A", "B"):
        raise ValueError(f'causal expects kind="A" or kind="B". Got kind={kind!r}.')
    if (in_channels is None) != (out_channels is None):
        raise ValueError(
            "causal's channel-group form needs both in_channels and out_channels. "
            f"Got in_channels={in_channels} and out_channels={out_channels}."
        )
    if in_channels is None or out_channels is None:
        if channel_groups is not None or interleaved:
            raise ValueError(
                "causal's channel_groups and interleaved apply only to the channel-group form: "
                "pass in_channels and out_channels too. Got "
                f"channel_groups={channel_groups} and interleaved={interleaved} without them."
            )
        return _causal_spatial(sizes, include_centre=kind == "B")

    c_in = _positive_int(in_channels, "in_channels")
    c_out = _positive_int(out_channels, "out_channels")
    groups = _positive_int(3 if channel_groups is None else channel_groups, "channel_groups")
    group_in = _channel_groups(c_in, groups, interleaved, "in_channels")
    group_out = _channel_groups(c_out, groups, interleaved, "out_channels")
    before = _causal_spatial(sizes, include_centre=False)
    full = before.expand(c_out, c_in, *sizes).clone()
    sees = group_in[None, :] <= group_out[:, None]
    if kind == "A":
        sees &= group_in[None, :] != group_out[:, None]
    # The centre's raster index is numel // 2 when every size is odd.
    full.view(c_out, c_in, -1)[:, :, math.prod(sizes) // 2] = sees
    return full


def _causal_spatial(sizes: tuple[int, ...], *, include_centre: bool) -> Tensor:
    order = torch.arange(math.prod(sizes)).reshape(sizes)
    centre = math.prod(sizes) // 2  # the raster index of the centre when every size is odd
    return order <= centre if include_centre else order < centre


def dilated(
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int],
    ndim: int | None = None,
) -> Tensor:
    """The taps of a dilated kernel, written out as a mask on its ``(k - 1) * d + 1`` grid.

    A convolution whose weight has this shape and this mask computes exactly what a
    ``kernel_size`` convolution with ``dilation=d`` and the same stride and padding
    computes, once the weights are placed on the kept taps (in raster order). Use it to hold
    a dilated pattern fixed in a layer that you then edit further, or to draw it.

    Args:
        kernel_size: The size of the undilated kernel, an int for every axis or one int per
            axis. Even sizes are allowed.
        dilation: The spacing between taps, an int for every axis or one int per axis, each
            at least 1.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.

    Returns:
        A bool tensor of shape ``(kernel_size - 1) * dilation + 1`` per axis.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size or a dilation
            is below 1, or the number of sizes, dilations and ``ndim`` disagree.

    Example:
        >>> print(to_text(dilated(3, 2, ndim=2)))  # doctest: -ELLIPSIS
        #.#.#
        .....
        #.#.#
        .....
        #.#.#
    """
    sizes = _kernel_size(kernel_size, ndim, "dilated")
    d = _as_int(dilation)
    if d is not None:
        steps: tuple[int, ...] = (d,) * len(sizes)
    else:
        as_ints = _ints(dilation)
        if as_ints is None:
            raise TypeError(
                f"dilated expects dilation as an int or a tuple of ints. Got {dilation!r}."
            )
        steps = as_ints
        if len(steps) != len(sizes):
            raise ValueError(
                "dilated expects one dilation per axis of the kernel. "
                f"Got kernel_size={sizes} and dilation={steps}."
            )
    if any(d < 1 for d in steps):
        raise ValueError(f"dilated expects every dilation to be at least 1. Got dilation={steps}.")
    axes = [torch.arange((k - 1) * d + 1) % d == 0 for k, d in zip(sizes, steps, strict=True)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids).all(dim=0)


def blind_spot(
    kernel_size: int | Sequence[int], ndim: int | None = None, radius: float = 0
) -> Tensor:
    """Every tap but the centre, or but a small ball around it (Noise2Void-style).

    Self-supervised denoisers learn to predict a pixel from its neighbours only; a kernel
    that never sees its own centre cannot learn the identity.

    Args:
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.
        radius: Taps within this L2 distance of the centre are switched off: 0 removes the
            centre only, 1 the centre and its face neighbours. The same ``1e-9`` margin as
            :func:`ball` applies.

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, ``ndim`` disagrees with ``kernel_size``, or ``radius`` is negative or not
            finite.

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
    sizes = _kernel_size(kernel_size, ndim, "blind_spot")
    _check_odd(sizes, "blind_spot")
    r = _radius(radius, "blind_spot")
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

    Args:
        kernel_size: The kernel's size, an odd int for every axis or one odd int per axis.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If ``kernel_size`` or ``ndim`` has another type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is even or
            below 1, or ``ndim`` disagrees with ``kernel_size``.

    Example:
        >>> print(to_text(checkerboard(5, ndim=2)))
        .#.#.
        #.#.#
        .#.#.
        #.#.#
        .#.#.
    """
    sizes = _kernel_size(kernel_size, ndim, "checkerboard")
    _check_odd(sizes, "checkerboard")
    total = sum(_offsets(sizes))
    assert isinstance(total, Tensor)
    return total.remainder(2) == 1


def line(kernel_size: int | Sequence[int], axis: int, ndim: int | None = None) -> Tensor:
    """The taps along one axis through the centre: a 1-D kernel inside an N-D one.

    Args:
        kernel_size: The kernel's size, an int for every axis or one int per axis. Sizes
            must be odd on every axis but ``axis``.
        axis: The axis the line runs along; negative values count from the end.
        ndim: The number of spatial dims; needed when ``kernel_size`` is an int.

    Returns:
        A bool tensor of shape ``kernel_size``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``kernel_size`` is an int and ``ndim`` is missing, if a size is below 1 or
            even on another axis, ``ndim`` disagrees with ``kernel_size``, or ``axis`` is out of
            range.

    Example:
        >>> print(to_text(line(3, axis=0, ndim=2)))
        .#.
        .#.
        .#.
        >>> print(to_text(line((1, 5), axis=-1)))
        #####
    """
    sizes = _kernel_size(kernel_size, ndim, "line")
    a = _as_int(axis)
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


def random(
    shape: int | Sequence[int], density: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """A fixed random mask with exactly ``round(density * numel)`` active taps.

    For lottery-ticket style work, where a sparse pattern is drawn once and then kept. The
    count is exact, not merely expected (Python's ``round``: a half goes to the even count).
    The same ``generator`` state gives the same mask.

    Args:
        shape: The mask's shape: an int for a 1-D mask, or a tuple, such as a kernel's
            spatial size or a full weight shape.
        density: The fraction of taps to keep, in [0, 1].
        generator: The random number generator to draw from; the global one by default.

    Returns:
        A bool tensor of shape ``shape``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a size is below 1, or ``density`` is outside [0, 1].

    Example:
        >>> mask = random((4, 6), 0.25, generator=torch.Generator().manual_seed(2))
        >>> int(mask.sum())
        6
        >>> print(to_text(mask))  # doctest: -ELLIPSIS
        #.....
        .#...#
        #.....
        .#..#.
    """
    n = _as_int(shape)
    sizes = (n,) if n is not None else _ints(shape)
    if sizes is None:
        raise TypeError(f"random expects shape as an int or a tuple of ints. Got {shape!r}.")
    if any(s < 1 for s in sizes):
        raise ValueError(f"random expects every size to be at least 1. Got shape={sizes}.")
    fraction = _as_float(density)
    if fraction is None:
        raise TypeError(f"random expects density as a number. Got {density!r}.")
    if not 0 <= fraction <= 1:  # also False for NaN
        raise ValueError(f"random expects a density in [0, 1]. Got density={density}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"random expects generator as a torch.Generator or None. Got {type(generator)}."
        )
    numel = math.prod(sizes)
    count = round(fraction * numel)
    device = torch.device("cpu") if generator is None else generator.device
    chosen = torch.randperm(numel, generator=generator, device=device)[:count].cpu()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(sizes)


# -- masks from a trained weight ------------------------------------------------------------
# Not a named shape: the taps a trained layer's own weights rank highest, for tap pruning.

# Weight dtypes whose sums of squares run in float32; every other real dtype runs in float64.
_FLOAT32_NORMS = (torch.float16, torch.bfloat16, torch.float32)


def top_taps(weight: Tensor, k: int | None = None, *, fraction: float | None = None) -> Tensor:
    """The ``k`` taps of a conv weight with the largest L2 norm over all channel pairs.

    Tap pruning: keep the kernel positions a trained layer relies on most, then run the
    layer with ``execution="taps"`` so that only those taps are computed. The norm of a tap
    is taken over the weight's first two dims, every (output, input) channel pair, so it is
    the same for a Conv1d/2d/3d weight ``(out, in / groups, *kernel_size)`` and for a
    ConvTranspose weight ``(in, out / groups, *kernel_size)``: pass either as it is.

    Give exactly one of ``k`` and ``fraction``. A fraction keeps
    ``max(1, round(fraction * taps))`` taps, with Python's ``round`` as in :func:`random`
    (a half goes to the even count: ``fraction=0.5`` of 9 taps keeps 4), so the same
    fraction gives both the same count. Ties go to the tap with the lower raster (flat)
    index. Norms are compared exactly as computed: sums of squares in float32 for float16,
    bfloat16 and float32 weights, in float64 for float64 and integer ones, on the weight's
    device, after scaling by a power of two (exact) so that large values cannot overflow.

    The weight of a masked layer (``conv.weight`` after :func:`~maskparam.apply_mask`) is
    already masked: its masked taps are zero and rank last. To rank the values the layer
    stores instead, masked taps included, pass
    ``conv.parametrizations.weight.original``.

    Args:
        weight: A conv weight: a real tensor with at least 3 dims, two channel dims and then
            the kernel's spatial dims. Pass ``conv.weight``, not the layer.
        k: How many taps to keep, from 1 to the number of taps.
        fraction: The fraction of taps to keep, in (0, 1].

    Returns:
        A CPU bool tensor of the kernel's spatial shape, ``weight.shape[2:]``, with exactly
        the requested number of taps True.

    Raises:
        TypeError: If ``weight`` is not a tensor (a module, say) or is bool or complex, or if
            ``k`` is not an int or ``fraction`` not a number (bools are neither).
        ValueError: If ``weight`` has fewer than 3 dims, no entries, NaN or infinite values,
            or lives on the meta device; if not exactly one of ``k`` and ``fraction`` is given,
            ``k`` is outside [1, taps], or ``fraction`` is outside (0, 1] or NaN.

    Example:
        >>> weight = torch.zeros(2, 1, 3, 3)
        >>> weight[0, 0, 0, 0], weight[1, 0, 1, 1], weight[1, 0, 2, 1] = 5, -3, 2
        >>> print(to_text(top_taps(weight, 2)))
        #..
        .#.
        ...
        >>> print(to_text(top_taps(weight, fraction=0.3)))  # round(2.7) = 3 taps
        #..
        .#.
        .#.
        >>> print(to_text(top_taps(torch.ones(1, 1, 3, 3), 4)))  # ties: lower index first
        ###
        #..
        ...
    """
    _check_conv_weight(weight)
    count = _tap_count(k, fraction, math.prod(weight.shape[2:]))
    norms = _tap_norms_squared(weight)
    # A stable descending sort keeps equal norms in raster order: ties go to the lower index.
    order = torch.sort(norms.cpu(), descending=True, stable=True).indices
    keep = torch.zeros(norms.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep.reshape(weight.shape[2:])


def _check_conv_weight(weight: object) -> None:
    """Raise unless ``weight`` is a real tensor with values, of a conv weight's dims."""
    if not isinstance(weight, Tensor):
        hint = (
            " Pass its weight, such as conv.weight." if isinstance(weight, torch.nn.Module) else ""
        )
        raise TypeError(
            f"top_taps expects a conv weight as a tensor.{hint} Got {type(weight).__name__}."
        )
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(
            f"top_taps expects a real-valued weight, floating point or integer. "
            f"Got dtype={weight.dtype}."
        )
    if weight.dim() < 3:
        raise ValueError(
            "top_taps expects a conv weight of at least 3 dims, (out, in / groups, "
            "*kernel_size) or a ConvTranspose's (in, out / groups, *kernel_size). "
            f"Got shape={tuple(weight.shape)}."
        )
    if weight.is_meta:
        raise ValueError(
            "top_taps ranks a weight by its values, and a tensor on the meta device has none. "
            f"Got a meta tensor of shape={tuple(weight.shape)}."
        )
    if weight.numel() == 0:
        raise ValueError(
            f"top_taps expects a weight with at least one entry. Got shape={tuple(weight.shape)}."
        )


def _tap_norms_squared(weight: Tensor) -> Tensor:
    """The squared L2 norm of each tap of a conv weight over its channel pairs, flat."""
    dtype = torch.float32 if weight.dtype in _FLOAT32_NORMS else torch.float64
    w = weight.detach().to(dtype).flatten(0, 1).flatten(1)  # (channel pairs, taps)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        raise ValueError(
            "top_taps cannot rank taps whose weights are NaN or infinite. "
            f"Got {int((~finite).sum())} such values of {w.numel()} in a weight of "
            f"shape={tuple(weight.shape)}."
        )
    largest = w.abs().max()
    if bool(largest > 0):
        # A power of two scales exactly, so the order of the norms and their ties stay as
        # they were, and no sum of squares can overflow.
        w = torch.ldexp(w, -torch.frexp(largest).exponent)
    # One contiguous row per tap: every tap's sum runs the same reduction, so taps with
    # equal values get exactly equal sums.
    return w.t().contiguous().square().sum(dim=1)


def _tap_count(k: object, fraction: object, taps: int) -> int:
    """The number of taps to keep, from exactly one of ``k`` and ``fraction``."""
    if (k is None) == (fraction is None):
        raise ValueError(
            "top_taps expects exactly one of k (a count) and fraction (a share of the taps). "
            f"Got k={k!r} and fraction={fraction!r}."
        )
    if k is not None:
        count = _as_int(k)
        if count is None:
            raise TypeError(
                f"top_taps expects k, the number of taps to keep, as an int. Got {k!r}."
            )
        if not 1 <= count <= taps:
            raise ValueError(
                f"top_taps expects k in [1, {taps}], the taps of this kernel. Got k={k}."
            )
        return count
    share = _as_float(fraction)
    if share is None:
        raise TypeError(f"top_taps expects fraction as a number. Got {fraction!r}.")
    if not 0 < share <= 1:  # also False for NaN
        raise ValueError(f"top_taps expects a fraction in (0, 1]. Got fraction={fraction}.")
    return max(1, round(share * taps))


# -- text form ------------------------------------------------------------------------------


def _as_drawable(mask: Any, caller: str, verb: str) -> Tensor:
    """``mask`` as a bool tensor of 1 to 3 non-empty dims, the masks text and pictures show."""
    out = _checks.as_bool_mask(mask, caller)
    if not 1 <= out.dim() <= 3:
        raise ValueError(
            f"{caller} {verb} masks of 1 to 3 dims; index a larger one down first "
            f"(for example mask[out, in]). Got shape={tuple(out.shape)}."
        )
    if out.numel() == 0:
        raise ValueError(
            f"{caller} expects every size to be at least 1. Got shape={tuple(out.shape)}."
        )
    return out


def to_text(mask: Tensor | Any) -> str:
    """Write a 1-D, 2-D or 3-D mask as text: ``#`` for an active tap, ``.`` for one off.

    A 1-D mask is one row; a 2-D mask one row per line; a 3-D mask its 2-D slices (along
    the first axis) separated by blank lines. There is no trailing newline.
    :func:`from_text` reads it back.

    Args:
        mask: Boolean tensor, or numbers that are all 0 or 1, with 1 to 3 dims.

    Returns:
        The text.

    Raises:
        TypeError: If ``mask`` is not tensor-like.
        ValueError: If ``mask`` has fewer than 1 or more than 3 dims, an empty axis, or values
            other than 0 and 1.

    Example:
        >>> print(to_text(ball(3, ndim=3, radius=math.sqrt(2))))
        .#.
        ###
        .#.
        <BLANKLINE>
        ###
        ###
        ###
        <BLANKLINE>
        .#.
        ###
        .#.
    """
    mask = _as_drawable(mask, "to_text", "writes")
    cube = mask.cpu().reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))
    slices = [
        "\n".join("".join(_ON if on else _OFF for on in row) for row in plane.tolist())
        for plane in cube
    ]
    return "\n\n".join(slices)


def from_text(text: str, *, ndim: int | None = None) -> Tensor:
    """Read a mask written as rows of ``#`` (active) and ``.`` (off), as :func:`to_text` does.

    One row gives a 1-D mask, several rows a 2-D mask, and blocks of rows separated by blank
    lines a 3-D mask. Whitespace around each row and blank lines around the whole text are
    ignored, so an indented triple-quoted string works. ``from_text(to_text(m))`` equals
    ``m`` whenever its first size is not 1 (or it is 1-D). Leading sizes of 1 leave no trace
    in the text, so a ``(1, 3)`` mask reads back as ``(3,)`` unless ``ndim`` says otherwise:
    ``from_text(to_text(m), ndim=m.dim())`` always equals ``m``.

    Args:
        text: The text.
        ndim: The number of dims to read into, 1 to 3; the text decides by default.
            ``ndim=2`` reads one row as shape ``(1, w)`` and ``ndim=3`` reads a single block
            as shape ``(1, h, w)``.

    Returns:
        A bool tensor.

    Raises:
        TypeError: If ``text`` is not a string.
        ValueError: If the text has no rows, a character other than ``#`` and ``.``, rows of
            different lengths, or blocks with different numbers of rows, or if it has more dims
            than ``ndim``.

    Example:
        >>> mask = from_text('''
        ...     .#.
        ...     ###
        ... ''')
        >>> mask
        tensor([[False,  True, False],
                [ True,  True,  True]])
        >>> from_text("#.#").shape, from_text("#.#", ndim=2).shape
        (torch.Size([3]), torch.Size([1, 3]))
    """
    if not isinstance(text, str):
        raise TypeError(f"from_text expects the mask as a str. Got {type(text).__name__}.")
    if ndim is not None and _as_int(ndim) not in (1, 2, 3):
        raise ValueError(f"from_text expects ndim to be 1, 2, 3 or None. Got ndim={ndim!r}.")
    blocks: list[list[tuple[int, str]]] = [[]]  # rows as (line number, row)
    for number, raw in enumerate(text.splitlines(), start=1):
        row = raw.strip()
        if not row:
            if blocks[-1]:
                blocks.append([])
            continue
        for column, char in enumerate(row, start=1):
            if char not in (_ON, _OFF):
                raise ValueError(
                    f"from_text expects rows of '{_ON}' (active) and '{_OFF}' (off) only. "
                    f"Got {char!r} at line {number}, column {column}: {row!r}."
                )
        blocks[-1].append((number, row))
    if not blocks[-1]:
        blocks.pop()
    if not blocks:
        raise ValueError(
            f"from_text expects at least one row of '{_ON}' and '{_OFF}'. Got {text!r}."
        )
    first_number, first_row = blocks[0][0]
    for number, row in (pair for block in blocks for pair in block):
        if len(row) != len(first_row):
            raise ValueError(
                "from_text expects rows of equal length. Got "
                f"{len(first_row)} characters at line {first_number} and {len(row)} at line "
                f"{number}."
            )
    for block in blocks:
        if len(block) != len(blocks[0]):
            raise ValueError(
                "from_text expects slices (blocks of rows between blank lines) of equal "
                f"height. Got {len(blocks[0])} rows in the block at line {first_number} "
                f"and {len(block)} in the block at line {block[0][0]}."
            )
    found = 3 if len(blocks) > 1 else 2 if len(blocks[0]) > 1 else 1
    if ndim is not None and found > ndim:
        what = f"{len(blocks)} slices" if found == 3 else f"{len(blocks[0])} rows"
        raise ValueError(
            f"from_text(ndim={ndim}) expects text of at most {ndim} dims. Got {what}."
        )
    dims = found if ndim is None else int(ndim)
    values = [[[char == _ON for char in row] for _, row in block] for block in blocks]
    mask = torch.tensor(values, dtype=torch.bool)
    return mask.reshape(mask.shape[3 - dims :])
