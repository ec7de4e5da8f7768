"""Transitional: two names that code outside maskparam/taps still imports from here.

``maskparam._tap_kernel`` (its double backward) imports ``_composite_grads``, and
``benchmarks/bench.py`` imports ``SCRATCH``. Both now live in :mod:`maskparam.taps`
(:func:`maskparam.taps.reference.composite_grads`, :data:`maskparam.taps.memory.SCRATCH`;
``maskparam.taps.empty_cache()`` clears the latter). Delete this module once those two
imports point there.
"""

from __future__ import annotations

from maskparam.taps.memory import SCRATCH
from maskparam.taps.reference import composite_grads as _composite_grads

__all__ = ["SCRATCH", "_composite_grads"]
