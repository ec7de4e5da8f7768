"""Pictures of masks, drawn with matplotlib.

matplotlib is an optional extra, ``pip install "maskparam[plot]"``; it is imported only when a
picture is drawn, so ``import maskparam`` never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from maskparam import _checks

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_mask"]

_ACTIVE = "#1f4e8c"
_INACTIVE = "#ffffff"
_EDGE = "#9a9a9a"
_CENTRE = "#e8702a"
_GAP = 1  # empty columns between the slices of a 3-D mask
_MAX_INCHES = (12.0, 8.0)


def plot_mask(mask: Tensor | Any, ax: Axes | None = None) -> Figure:
    """Draw a 1-D, 2-D or 3-D mask as a grid of cells, and return the figure.

    Active taps are filled cells, switched-off taps empty ones, and a dot marks the centre
    when every size is odd. A 1-D mask is one row, a 2-D mask has its first axis running
    down, and a 3-D mask is drawn as a row of its 2-D slices ``mask[0]``, ``mask[1]``, ...,
    each labelled, all in the one axes.

    Args:
        mask: Boolean tensor, or numbers that are all 0 or 1, with 1 to 3 dims.
        ax: The :class:`matplotlib.axes.Axes` to draw in. By default a new figure is made
            with :func:`matplotlib.pyplot.subplots`, sized to the mask.

    Returns:
        The :class:`matplotlib.figure.Figure` holding the picture (the root figure, when
        ``ax`` lies in a subfigure).

    Raises:
        ImportError: If matplotlib is not installed; the message says how to install it.
        TypeError: If ``mask`` is not tensor-like.
        ValueError: If ``mask`` has fewer than 1 or more than 3 dims, an empty axis, or
            values other than 0 and 1.

    Example:
        ``plot_mask(masks.cross(3, ndim=3)).savefig("cross.png")`` writes a picture. Into
        axes of your own:

        >>> from matplotlib.figure import Figure
        >>> from maskparam.masks import cross
        >>> fig = Figure()
        >>> plot_mask(cross(3, ndim=3), ax=fig.add_subplot()) is fig
        True
    """
    mask = _checks.as_drawable_mask(mask, "plot_mask", "draws")
    try:
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Circle, Rectangle

        if ax is None:
            import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            'plot_mask needs matplotlib, an optional extra: pip install "maskparam[plot]" '
            f"(or pip install matplotlib). Importing it failed with: {err}"
        ) from err

    cube = mask.cpu().reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))
    depth, height, width = cube.shape
    columns = depth * width + (depth - 1) * _GAP
    rows = height + (1 if depth > 1 else 0)  # a line of slice labels above a 3-D mask
    if ax is None:
        inches = min(0.4, _MAX_INCHES[0] / columns, _MAX_INCHES[1] / rows)
        _, ax = plt.subplots(figsize=(columns * inches + 0.4, rows * inches + 0.4))

    cells: list[Rectangle] = []
    for s, plane in enumerate(cube.tolist()):
        left = s * (width + _GAP)
        for i, row in enumerate(plane):
            cells.extend(Rectangle((left + j, i), 1, 1, fill=on) for j, on in enumerate(row))
        if depth > 1:
            ax.text(left + width / 2, -0.25, f"[{s}]", ha="center", va="bottom")
    active = cube.flatten().tolist()
    ax.add_collection(
        PatchCollection(
            cells,
            facecolors=[_ACTIVE if on else _INACTIVE for on in active],
            edgecolors=_EDGE,
            linewidths=0.8,
        )
    )
    if all(size % 2 for size in mask.shape):
        c_depth, c_row, c_column = depth // 2, height // 2, width // 2
        centre = (c_depth * (width + _GAP) + c_column + 0.5, c_row + 0.5)
        ax.add_patch(Circle(centre, 0.2, color=_CENTRE, zorder=3, label="centre"))

    ax.set_xlim(-0.2, columns + 0.2)
    ax.set_ylim(height + 0.2, -0.2 - (0.8 if depth > 1 else 0))  # first row at the top
    ax.set_aspect("equal")
    ax.set_axis_off()
    figure: Figure = ax.figure.figure  # the root, also when ax lies in a subfigure
    return figure
