"""PixelCNN's autoregressive mask, per kernel or per channel group.

See :mod:`maskparam.masks` for the arguments, results and errors the shapes share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from maskparam.masks import _args
from maskparam.masks.text import to_text  # noqa: F401  (the examples draw with it)

__all__ = ["causal"]


def _positive_int(value: object, name: str) -> int:
    number = _args.as_int(value)
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
        kernel_size: The kernel's size, odd along every axis.
        ndim: The number of spatial dims, for an int ``kernel_size``.
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
        ValueError: If ``kind`` is neither "A" nor "B", only one channel count is given, a
            channel option is given without the channel counts, or a channel count is not a
            positive multiple of ``channel_groups``.

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
    sizes = _args.kernel_sizes(kernel_size, ndim, "causal")
    _args.check_odd(sizes, "causal")
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
