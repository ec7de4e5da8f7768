"""Argument checks shared by the mask factories: numbers, kernel sizes and radii.

Each check names the factory that called it (``caller``) and raises with the rule and the
value received, so every factory reports a bad argument in the same words.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def as_int(value: object) -> int | None:
    """``value`` as an int if it is one (NumPy's included, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_float(value: object) -> float | None:
    """``value`` as a float if it is a real number (NumPy's included, bools not), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_ints(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints if it is a non-string sequence of ints, else None."""
    return _as_tuple(value, as_int)


def as_floats(value: object) -> tuple[float, ...] | None:
    """``value`` as a tuple of floats if it is a non-string sequence of numbers, else None."""
    return _as_tuple(value, as_float)


def _as_tuple(value: object, convert: Callable[[object], T | None]) -> tuple[T, ...] | None:
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [convert(v) for v in value]
        if all(i is not None for i in items):
            return tuple(i for i in items if i is not None)
    return None


def kernel_sizes(
    kernel_size: int | Sequence[int], ndim: int | None, caller: str
) -> tuple[int, ...]:
    """The kernel size as one int per axis, after checking it against ``ndim``."""
    if ndim is not None:
        if as_int(ndim) is None:
            raise TypeError(
                f"{caller} expects ndim, the number of spatial dims, as an int. Got ndim={ndim!r}."
            )
        if ndim < 1:
            raise ValueError(f"{caller} expects ndim to be at least 1. Got ndim={ndim}.")
    k = as_int(kernel_size)
    if k is not None:
        if ndim is None:
            raise ValueError(
                f"{caller} needs ndim when kernel_size is an int: pass ndim=2 for a {k}x{k} "
                f"kernel, or a tuple such as kernel_size=({k}, {k}). Got kernel_size={k} "
                "and no ndim."
            )
        sizes: tuple[int, ...] = (k,) * int(ndim)
    else:
        several = as_ints(kernel_size)
        if several is None:
            raise TypeError(
                f"{caller} expects kernel_size as an int or a tuple of ints. Got {kernel_size!r}."
            )
        sizes = several
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


def check_odd(sizes: tuple[int, ...], caller: str) -> None:
    """Raise unless every size is odd: the shapes that have a centre tap need one."""
    if any(k % 2 == 0 for k in sizes):
        raise ValueError(
            f"{caller} needs an odd kernel size along every axis, so that the kernel has a "
            f"centre tap. Got kernel_size={sizes}."
        )


def as_radius(radius: object, caller: str) -> float:
    """``radius`` as a float, if it is a finite number of at least 0."""
    r = as_float(radius)
    if r is None:
        raise TypeError(f"{caller} expects radius as a number. Got {radius!r}.")
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"{caller} expects a finite radius of at least 0. Got radius={radius}.")
    return r
