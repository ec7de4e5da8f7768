"""Active-tap execution: a masked conv that computes only the taps its mask keeps.

``apply_mask(conv, mask, execution="taps")`` makes a ``Conv1d``/``2d``/``3d`` skip the taps
its mask switches off. The result is the dense convolution, up to the order of
floating-point sums: masked taps are zero in the weight, and skipping a zero term changes
nothing. Each call takes one path, chosen by a table of rules
(:data:`maskparam.taps.choose.RULES`; :func:`explain` says which path a call takes, and
why):

- **The tap kernel** (CPU, float32, stride 1, one group, contiguous or channels-last input,
  output planes as large as the input's, as with "same" padding): a small C kernel for
  x86-64 CPUs with AVX-512 or AVX2 and for ARM64, compiled with the system's C compiler at
  its first use and kept in a cache folder (:func:`kernel_status` says whether it is in use
  here, and why not). It sums every active tap of a position in registers, in either
  layout, and has its own input and weight gradients. The few choices in it that depend on
  the CPU are timed once per CPU and cached (:func:`kernel_tuning`). Under
  :func:`torch.compile` it is one custom op, ``torch.ops.maskparam.tap_conv``, differentiable
  once.
- **The boxes**, everywhere else: the active taps are split exactly into a few *boxes*,
  dense blocks of taps evenly spaced along each axis (a box with spacing 2 is a dilated
  kernel), each run as an ordinary convolution with its slice of the weight, in
  channels-last layout, and the outputs are summed. A 3x3x3 cross (7 of 27 taps) becomes
  three boxes, a 5x5x5 ball (33 of 125) four. On the CPU each box adds its convolution into
  the sum as the conv library writes it, and a hand-written backward sums the input
  gradients the same way. Elsewhere (CUDA, :func:`torch.compile`, forward-mode AD, a double
  backward) the boxes run as ordinary differentiable torch operations, as does the double
  backward of the kernel.

``execution="auto"`` measures, once per input shape, which of three paths is fastest for this
layer: the dense convolution as it is, the dense convolution in channels-last layout, and the
active taps. It keeps dense unless another path is clearly faster, so it never picks a slower
path (up to timing noise). See :class:`TapExecution` for the details and the fallbacks.

The subpackage, one job per file: ``boxes.py`` (the decomposition), ``plan.py`` (where
each box reads, per input size), ``memory.py`` (layout copies, scratch buffers),
``reference.py`` and ``fused.py`` (the box paths), ``build.py`` (compiling and caching
``tapconv.c``), ``kernel.py`` (the tap kernel as an op, and when it takes a call),
``tune.py`` (the kernel's CPU-dependent choices),
``paths.py`` (every path, by name), ``choose.py`` (the rules), ``auto.py`` (what
``"auto"`` times, and how) and ``execution.py`` (what ``apply_mask`` records, which times
``"auto"``'s candidates). The rest of maskparam imports only this module.
"""

from __future__ import annotations

from typing import Any

from maskparam.taps.boxes import MAX_BOXES, Box, decompose, spatial_support
from maskparam.taps.execution import (
    EXECUTIONS,
    Execution,
    Explanation,
    TapExecution,
    _replan_after_load,
    explain,
    prepare,
    unwatch,
    watch,
)
from maskparam.taps.kernel import kernel_status
from maskparam.taps.memory import empty_cache
from maskparam.taps.paths import run_boxes
from maskparam.taps.tune import settings as kernel_tuning  # registers the kernel's tuner

__all__ = [
    "EXECUTIONS",
    "MAX_BOXES",
    "SAFE_GLOBALS",
    "Box",
    "Execution",
    "Explanation",
    "TapExecution",
    "decompose",
    "empty_cache",
    "explain",
    "kernel_status",
    "kernel_tuning",
    "prepare",
    "run_boxes",
    "spatial_support",
    "unwatch",
    "watch",
]

# Pickles name these by this module, whatever file defines them, as maskparam 0.1.0 did:
# the files inside the subpackage can change without breaking saved models.
for _public in (Box, TapExecution, _replan_after_load):
    _public.__module__ = __name__

SAFE_GLOBALS: tuple[Any, ...] = (TapExecution, Box, _replan_after_load)
"""What a pickled model with ``execution="taps"``/``"auto"`` needs from here to load with
``torch.load(path, weights_only=True)``. :data:`maskparam.checkpoint.SAFE_GLOBALS`, the list
to allow, includes them."""
