"""Named kernel masks as boolean tensors, and a readable text form for them.

Every factory is a pure function that returns a new CPU ``torch.bool`` tensor (True keeps a
tap), ready for :func:`~maskparam.apply_mask`.

The named shapes share their conventions:

- ``kernel_size`` is the kernel's size, an int for every axis or one int per axis;
  ``ndim``, the number of spatial dims, is needed when ``kernel_size`` is an int.
- Offsets from the centre are ``o = index - size // 2`` along each axis. A shape defined
  by its centre (all but :func:`box`, :func:`dilated` and :func:`random`) needs an odd
  size along every axis; :func:`line` only on the axes it does not run along.
- The result has the shape ``kernel_size`` unless a factory says otherwise.
- Distances within a relative ``1e-9`` of a radius count as inside, so
  ``radius=math.sqrt(2)`` keeps the taps at distance sqrt(2).

Errors: every factory checks all of its arguments before it builds anything, and raises

- ``TypeError`` if an argument has the wrong type (bools are neither ints nor
  numbers; NumPy's integers and floats are accepted);
- ``ValueError`` if ``kernel_size`` is an int and ``ndim`` is missing, if a size is
  below 1 (or even, where the shape needs a centre), if ``ndim`` disagrees with
  ``kernel_size``, or if a radius is negative or not finite.

A factory lists only the errors of its own options. Every message names the factory, the
rule and the value it got.
"""

from maskparam.masks.autoregressive import causal
from maskparam.masks.grids import box, dilated, random
from maskparam.masks.pruning import top_taps
from maskparam.masks.shapes import ball, blind_spot, checkerboard, cross, diamond, hexagonal, line
from maskparam.masks.text import from_text, to_text

# The docs list the factories in this order: the shapes, a mask from a weight, the text form.
__all__ = [  # noqa: RUF022
    "box",
    "cross",
    "diamond",
    "ball",
    "hexagonal",
    "causal",
    "dilated",
    "blind_spot",
    "checkerboard",
    "line",
    "random",
    "top_taps",
    "to_text",
    "from_text",
]
