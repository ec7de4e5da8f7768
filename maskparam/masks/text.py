"""The text form of a mask: ``#`` for an active tap, ``.`` for one off."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from maskparam import _checks
from maskparam.masks import _args

__all__ = ["from_text", "to_text"]

_ON, _OFF = "#", "."


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
        >>> from maskparam.masks import ball
        >>> print(to_text(ball(3, ndim=3, radius=1.5)))
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
    mask = _checks.as_drawable_mask(mask, "to_text", "writes")
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
    if ndim is not None and _args.as_int(ndim) not in (1, 2, 3):
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
