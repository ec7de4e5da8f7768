"""Masks from a trained weight: the taps its norms rank highest, for tap pruning."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from maskparam.masks import _args
from maskparam.masks.text import to_text  # noqa: F401  (the examples draw with it)

__all__ = ["top_taps"]


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
        count = _args.as_int(k)
        if count is None:
            raise TypeError(
                f"top_taps expects k, the number of taps to keep, as an int. Got {k!r}."
            )
        if not 1 <= count <= taps:
            raise ValueError(
                f"top_taps expects k in [1, {taps}], the taps of this kernel. Got k={k}."
            )
        return count
    share = _args.as_float(fraction)
    if share is None:
        raise TypeError(f"top_taps expects fraction as a number. Got {fraction!r}.")
    if not 0 < share <= 1:  # also False for NaN
        raise ValueError(f"top_taps expects a fraction in (0, 1]. Got fraction={fraction}.")
    return max(1, round(share * taps))
