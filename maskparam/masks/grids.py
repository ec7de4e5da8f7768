"""Masks without a centre: every tap, the taps of a dilated kernel, a random draw.

See :mod:`maskparam.masks` for the arguments, results and errors the masks share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from maskparam.masks import _args
from maskparam.masks.text import to_text  # noqa: F401  (the examples draw with it)

__all__ = ["box", "dilated", "random"]


def box(kernel_size: int | Sequence[int], ndim: int | None = None) -> Tensor:
    """Every tap: the mask of an ordinary dense kernel.

    Even sizes are allowed.

    Example:
        >>> print(to_text(box((2, 3))))
        ###
        ###
    """
    return torch.ones(_args.kernel_sizes(kernel_size, ndim, "box"), dtype=torch.bool)


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
        ndim: The number of spatial dims, for an int ``kernel_size``.

    Returns:
        A bool tensor of shape ``(kernel_size - 1) * dilation + 1`` per axis.

    Raises:
        ValueError: If a dilation is below 1, or there is not one per axis.

    Example:
        >>> print(to_text(dilated(3, 2, ndim=2)))  # doctest: -ELLIPSIS
        #.#.#
        .....
        #.#.#
        .....
        #.#.#
    """
    sizes = _args.kernel_sizes(kernel_size, ndim, "dilated")
    d = _args.as_int(dilation)
    if d is not None:
        steps: tuple[int, ...] = (d,) * len(sizes)
    else:
        several = _args.as_ints(dilation)
        if several is None:
            raise TypeError(
                f"dilated expects dilation as an int or a tuple of ints. Got {dilation!r}."
            )
        steps = several
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
        ValueError: If ``density`` is outside [0, 1].

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
    n = _args.as_int(shape)
    sizes = (n,) if n is not None else _args.as_ints(shape)
    if sizes is None:
        raise TypeError(f"random expects shape as an int or a tuple of ints. Got {shape!r}.")
    if any(s < 1 for s in sizes):
        raise ValueError(f"random expects every size to be at least 1. Got shape={sizes}.")
    fraction = _args.as_float(density)
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
