"""Active-tap execution: a masked conv that computes only the taps its mask keeps.

``apply_mask(conv, mask, execution="taps")`` makes a ``Conv1d``/``2d``/``3d`` skip the taps
its mask switches off. The result is the dense convolution, up to the order of
floating-point sums: masked taps are zero in the weight, and skipping a zero term changes
nothing. There are two ways to do it; each call takes the first that applies.

- **The tap kernel** (CPU, float32, stride 1, one group, input in the default layout, output
  planes as large as the input's, as with "same" padding): a small C kernel for x86-64 CPUs
  with AVX-512, compiled with the system's C compiler at its first use and kept in a cache
  folder (:func:`kernel_status` says whether it is in use here, and why not). It sums every
  active tap of a position in registers, in the layout torch gives by default, and has its
  own input and weight gradients. Under :func:`torch.compile` it is one custom op,
  ``torch.ops.maskparam.tap_conv``, differentiable once.
- **The boxes**, everywhere else: the active taps are split exactly into a few *boxes*,
  dense blocks of taps evenly spaced along each axis (a box with spacing 2 is a dilated
  kernel), each run as an ordinary convolution with its slice of the weight, in
  channels-last layout, and the outputs are summed. A 3x3x3 cross (7 of 27 taps) becomes
  three boxes, a 5x5x5 ball (33 of 125) four. On the CPU each box adds its convolution into
  the sum as the conv library writes it, a 3-D box one tap deep (or one tap high and wide)
  runs as a 2-D convolution of a view of the input, and a hand-written backward sums the
  input gradients the same way. Elsewhere (CUDA, :func:`torch.compile`, forward-mode AD, a
  double backward) the boxes run as ordinary differentiable torch operations, as does the
  double backward of the kernel.

``execution="auto"`` measures, once per input shape, which of three paths is fastest for this
layer: the dense convolution as it is, the dense convolution in channels-last layout, and the
active taps. It keeps dense unless another path is clearly faster, so it never picks a slower
path (up to timing noise). See :class:`TapExecution` for the details and the fallbacks.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskparam import _checks, _tap_kernel
from maskparam._taps_kernels import (
    CONV,
    SCRATCH,
    Fold,
    FusedBoxes,
    Layout,
    Step,
    copy_layout,
    is_channels_last,
    memory_format,
)

__all__ = [
    "EXECUTIONS",
    "MAX_BOXES",
    "Box",
    "Execution",
    "TapExecution",
    "decompose",
    "empty_cache",
    "kernel_status",
    "prepare",
    "run_boxes",
    "spatial_support",
    "unwatch",
    "watch",
]

Execution = Literal["dense", "taps", "auto"]
"""How a masked conv runs, see :func:`maskparam.apply_mask`."""

EXECUTIONS: tuple[str, ...] = get_args(Execution)

MAX_BOXES = 32
"""A mask whose active taps need more boxes than this runs no boxes: too many small convs.

The tap kernel still runs it where it applies; elsewhere it runs dense.
"""

# "auto" keeps dense unless another path takes at most this fraction of dense's time.
_AUTO_MARGIN = 0.9
# "auto" considers the boxes only when they skip at least this fraction of the taps.
_AUTO_MAX_ACTIVE = 0.75
_DEVICES = ("cpu", "cuda")


# -- decomposition ---------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A block of kernel taps: ``count[i]`` taps from ``start[i]``, ``step[i]`` apart.

    Example:
        >>> box = Box(start=(1, 0), count=(1, 2), step=(1, 2))
        >>> box.taps()
        [(1, 0), (1, 2)]
    """

    start: tuple[int, ...]
    count: tuple[int, ...]
    step: tuple[int, ...]

    @property
    def size(self) -> int:
        """The number of taps in the box."""
        return math.prod(self.count)

    def slices(self) -> tuple[slice, ...]:
        """One slice per kernel axis that picks the box out of a weight's spatial dims."""
        return tuple(
            slice(a, a + (n - 1) * q + 1, q)
            for a, n, q in zip(self.start, self.count, self.step, strict=True)
        )

    def taps(self) -> list[tuple[int, ...]]:
        """The kernel positions the box covers, in row-major order."""
        axes = [
            range(a, a + (n - 1) * q + 1, q)
            for a, n, q in zip(self.start, self.count, self.step, strict=True)
        ]
        return list(itertools.product(*axes))


def decompose(mask: Tensor, *, max_boxes: int = MAX_BOXES) -> tuple[Box, ...] | None:
    """Split the True entries of a kernel mask exactly into disjoint :class:`Box` es.

    Greedy: the largest box that fits in the taps not yet covered comes first (ties go to
    the smallest total spacing, then the first position), until every active tap is covered.

    Args:
        mask: Bool tensor of the kernel's spatial shape, 1 to 3 dims.
        max_boxes: Give up (return None) when more boxes than this would be needed.

    Returns:
        The boxes, largest first; ``()`` for an all-False mask; None past ``max_boxes``, or
        for a mask too irregular to split in a bounded search (a large random kernel).

    Example:
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
        >>> [(b.start, b.count, b.step) for b in decompose(plus)]
        [((0, 1), (3, 1), (1, 1)), ((1, 0), (1, 2), (1, 2))]
    """
    shape = tuple(int(k) for k in mask.shape)
    # The remaining taps as nested lists over all axes but the last, of bitmasks over it.
    table = _bit_table(mask.detach().to("cpu", torch.bool).tolist(), len(shape))
    progressions = [_progressions(k) for k in shape]
    boxes: list[Box] = []
    budget = [_SEARCH_BUDGET]
    while _any_bit(table):
        if len(boxes) == max_boxes:
            return None
        try:
            box = _largest_box(table, shape, progressions, budget)
        except _OverBudget:
            return None
        for tap in box.taps():
            table = _clear_bit(table, tap)
        boxes.append(box)
    return tuple(boxes)


# Candidate boxes decompose() may examine in all: a few hundred milliseconds at most, and
# far more than any mask that gains from the boxes needs.
_SEARCH_BUDGET = 250_000


class _OverBudget(Exception):
    pass


_Table = Any  # int, or a nested list of ints: the remaining taps, one bitmask per last axis


def _bit_table(values: Any, nd: int) -> _Table:
    if nd == 1:
        return sum(1 << i for i, v in enumerate(values) if v)
    return [_bit_table(v, nd - 1) for v in values]


def _any_bit(table: _Table) -> bool:
    return bool(table) if isinstance(table, int) else any(_any_bit(t) for t in table)


def _max_bits(table: _Table) -> int:
    if isinstance(table, int):
        return table.bit_count()
    return max((_max_bits(t) for t in table), default=0)


def _and(a: _Table, b: _Table) -> _Table:
    return a & b if isinstance(a, int) else [_and(x, y) for x, y in zip(a, b, strict=True)]


def _clear_bit(table: _Table, tap: tuple[int, ...]) -> _Table:
    if len(tap) == 1:
        return int(table) & ~(1 << tap[0])
    table = list(table)
    table[tap[0]] = _clear_bit(table[tap[0]], tap[1:])
    return table


def _progressions(k: int) -> list[tuple[int, int, int]]:
    """Every ``(start, step, count)`` that fits in ``range(k)``: most taps, then smallest step.

    A single tap has step 1.
    """
    out = [(a, 1, 1) for a in range(k)]
    for a in range(k):
        for q in range(1, k):
            for n in range(2, (k - 1 - a) // q + 2):
                out.append((a, q, n))
    out.sort(key=lambda p: (-p[2], p[1], p[0]))
    return out


def _largest_box(
    table: _Table,
    shape: tuple[int, ...],
    progressions: list[list[tuple[int, int, int]]],
    budget: list[int],
) -> Box:
    """The largest box inside the remaining taps, ties broken as :func:`decompose` says."""
    nd = len(shape)
    best_key: tuple[int, ...] | None = None
    best: list[tuple[int, int, int]] = []

    def search(dim: int, chosen: list[tuple[int, int, int]], size: int, sub: _Table) -> None:
        nonlocal best_key, best
        last = dim == nd - 1
        # The most taps the axes after this one can add: every row of the next axes, each
        # with as many taps as the fullest bitmask.
        cap = 1 if last else math.prod(shape[dim + 1 : nd - 1]) * _max_bits(sub)
        for a, q, n in progressions[dim]:
            if best_key is not None and size * n * cap < -best_key[0]:
                # Progressions come most taps first: none further on can do better.
                return
            budget[0] -= 1
            if budget[0] < 0:
                raise _OverBudget
            rows = [sub >> (a + j * q) if last else sub[a + j * q] for j in range(n)]
            if last:
                if not all(r & 1 for r in rows):
                    continue
                box = [*chosen, (a, q, n)]
                key = (
                    -size * n,
                    sum(p[1] for p in box),
                    *(p[0] for p in box),
                    *(p[1] for p in box),
                )
                if best_key is None or key < best_key:
                    best_key, best = key, box
                continue
            inner = rows[0]
            for r in rows[1:]:
                inner = _and(inner, r)
            if _any_bit(inner):
                search(dim + 1, [*chosen, (a, q, n)], size * n, inner)

    search(0, [], 1, table)
    return Box(
        start=tuple(p[0] for p in best),
        count=tuple(p[2] for p in best),
        step=tuple(p[1] for p in best),
    )


def spatial_support(mask: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """The kernel positions that are active for at least one channel pair, as a CPU bool.

    Args:
        mask: A mask that broadcasts to ``weight_shape``.
        weight_shape: ``(C_out, C_in / groups, *kernel_size)``.

    Returns:
        A bool tensor of shape ``weight_shape[2:]``, on the CPU.

    Example:
        >>> per_channel = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
        >>> spatial_support(per_channel.view(2, 1, 3), (2, 4, 3))
        tensor([ True, False,  True])
    """
    full = mask.reshape((1,) * (len(weight_shape) - mask.dim()) + tuple(mask.shape))
    support = full.any(dim=1).any(dim=0)
    return support.expand(tuple(weight_shape[2:])).to("cpu", copy=True).contiguous()


# -- the stored choice -----------------------------------------------------------------


class TapExecution:
    """What ``apply_mask(..., execution=...)`` records on a conv: the mode and its plan.

    The plan is the :func:`decompose` of the mask's :func:`spatial_support`. It is rebuilt
    when the mask changes (:func:`~maskparam.set_mask`, ``load_state_dict``, ``.to()``, an
    in-place edit of the mask buffer), so it never goes stale, and it pickles and
    deep-copies with the module. Under :func:`torch.compile` the plan is part of the
    compiled code: ``set_mask`` and ``load_state_dict`` make torch recompile, but an in-place
    edit of the mask buffer is seen only after the next call outside the compiled code.

    Paths, per forward:

    - ``"taps"``: the tap kernel where it applies (see the module's introduction), else
      the boxes, in channels-last layout; input and output keep the layout the dense
      convolution would give them. On the CPU, the boxes' temporaries that change layout
      (a few, each the size of the input or the output) are buffers kept for the next
      call, as writing to freshly allocated large buffers costs page faults;
      ``empty_cache()`` frees them.
    - ``"auto"``: the first forward for each input shape, dtype, device, layout and grad
      mode times dense, dense in channels-last layout, and the taps (forward, plus
      backward when gradients are needed), a warm-up and three interleaved rounds each on
      the actual input, and keeps the fastest; dense unless another takes at most 90% of
      its time. Under :func:`torch.compile` it uses that cached choice, or dense.

    Cases neither covers run dense, with a warning when ``"taps"`` was asked for: a mask
    with no active tap, or one that needs more than :data:`MAX_BOXES` boxes where the tap
    kernel does not take the call; another parametrization after the mask, a device other
    than CPU or CUDA, a dtype that is not floating point.

    Args:
        mode: ``"taps"`` or ``"auto"``.
        support: Bool tensor of the kernel's spatial shape, from :func:`spatial_support`.

    Example:
        >>> plan = TapExecution("taps", torch.tensor([True, False, True]))
        >>> plan.boxes
        (Box(start=(0,), count=(2,), step=(2,)),)
    """

    def __init__(self, mode: str, support: Tensor) -> None:
        self.mode = mode
        self._plan(support)

    def _plan(self, support: Tensor) -> None:
        self.support = support
        self.boxes = decompose(support)
        self.reason: str | None = None
        # For a mask too fragmented for boxes: its taps one by one, which the tap kernel can
        # run (it needs only the taps) and a double backward differentiates, slowly.
        self.tap_boxes: tuple[Box, ...] = ()
        if self.boxes is None:
            self.reason = (
                f"its active taps need more than {MAX_BOXES} boxes, too many small "
                "convolutions to gain anything, and the tap kernel does not take this call"
            )
            nd = support.dim()
            self.tap_boxes = tuple(
                Box(tuple(tap), (1,) * nd, (1,) * nd) for tap in support.nonzero().tolist()
            )
        elif not self.boxes:
            self.reason = "the mask has no active tap"
        self._seen: weakref.ref[Tensor] | None = None
        self._seen_version = -1
        # "auto": the path chosen per input signature, for use under torch.compile.
        self._choices: dict[tuple[Any, ...], str] = {}

    def replanned(
        self, module: nn.Module, mask: Tensor, weight_shape: Sequence[int]
    ) -> TapExecution:
        """A plan of the same mode for a new ``mask``; warns as :func:`prepare` does."""
        plan = TapExecution(self.mode, spatial_support(mask, weight_shape))
        if plan.reason is not None and self.mode == "taps" and not plan.kernel_may_run(module):
            _warn_fallback(module, plan.reason, stacklevel=4)
        return plan

    def kernel_may_run(self, module: nn.Module) -> bool:
        """Whether a mask too fragmented for boxes may still run in the tap kernel.

        True if the layer's options and weight suit the kernel; whether it runs is then
        up to each call's input.
        """
        weight = getattr(module, "weight", None)
        return (
            bool(self.tap_boxes)
            and isinstance(module, nn.modules.conv._ConvNd)
            and isinstance(weight, Tensor)
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and module.groups == 1
            and all(s == 1 for s in module.stride)
            and module.padding_mode == "zeros"
            and _tap_kernel.library() is not None
        )

    @property
    def active_fraction(self) -> float:
        """Active taps over all taps of the kernel."""
        return int(self.support.sum()) / max(1, self.support.numel())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_seen"] = None  # A weak reference neither pickles nor deep-copies.
        state["_seen_version"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "tap_boxes" not in state:  # pickled by maskparam 0.1.0, before the tap kernel
            self._plan(self.support)

    def __repr__(self) -> str:
        n = "none" if self.boxes is None else len(self.boxes)
        return (
            f"TapExecution(mode={self.mode!r}, active={int(self.support.sum())}/"
            f"{self.support.numel()}, boxes={n})"
        )

    def refresh(self, module: nn.Module, mask: Tensor) -> None:
        """Re-plan if ``mask`` is not the tensor, or version, the plan was checked against."""
        seen = self._seen() if self._seen is not None else None
        if seen is mask and self._seen_version == mask._version:
            return
        chain = cast(nn.ModuleDict, module.parametrizations)["weight"]
        weight_shape = cast(Tensor, chain.original).shape
        support = spatial_support(mask, weight_shape)
        if not torch.equal(support, self.support):
            self._plan(support)
        self._seen = weakref.ref(mask)
        self._seen_version = mask._version

    def forward(
        self, module: nn.modules.conv._ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """The layer's ``_conv_forward`` under this execution."""
        dense = type(module)._maskparam_base._conv_forward  # type: ignore[attr-defined]
        compiling = torch.compiler.is_compiling()
        reason = _unsupported(module, input, weight)
        if reason is None and not compiling:
            self.refresh(module, cast(Tensor, _outermost(module).mask))
        boxes = self.boxes
        if (
            reason is None
            and boxes is None
            and not compiling
            and _kernel_takes(module, input, weight, bias, self.tap_boxes)
        ):
            boxes = self.tap_boxes  # too fragmented for boxes, but the kernel takes it
        reason = reason or (None if boxes else self.reason)
        if reason is not None:
            if self.mode == "taps":
                _warn_fallback(module, reason)
            out: Tensor = dense(module, input, weight, bias)
            return out
        assert boxes is not None
        if self.mode == "taps":
            return _run("taps", module, input, weight, bias, boxes)
        path = self._choose(module, input, weight, bias, boxes)
        return _run(path, module, input, weight, bias, boxes)

    def _choose(
        self,
        module: nn.modules.conv._ConvNd,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        boxes: tuple[Box, ...],
    ) -> str:
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad
            or weight.requires_grad
            or bool(bias is not None and bias.requires_grad)
        )
        device = input.device.type
        signature = (
            tuple(input.shape),
            input.dtype,
            input.device,
            is_channels_last(input),
            needs_grad,
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
        )
        if torch.compiler.is_compiling():
            # No timing inside a trace: the choice eager mode made for this input, or dense.
            return self._choices.get(signature, "dense")
        key = (
            signature,
            type(module).__name__,
            tuple(weight.shape),
            is_channels_last(weight),
            bias is not None,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
            boxes,
            torch.get_num_threads(),
        )
        choice = _DECISIONS.get(key)
        if choice is None:
            candidates = ["dense"]
            batched = input.dim() == len(module.kernel_size) + 2
            if batched and len(module.kernel_size) >= 2 and not is_channels_last(input):
                candidates.append("dense_cl")
            if self.active_fraction <= _AUTO_MAX_ACTIVE:
                candidates.append("taps")
            choice = "dense"
            if len(candidates) > 1:
                times = _measure(candidates, module, input, weight, bias, boxes, needs_grad)
                fastest = min(candidates, key=lambda c: times[c])
                if times[fastest] <= _AUTO_MARGIN * times["dense"]:
                    choice = fastest
            _DECISIONS[key] = choice
        self._choices[signature] = choice
        return choice


_DECISIONS: dict[tuple[Any, ...], str] = {}


def watch(module: nn.Module) -> None:
    """Re-plan ``module`` whenever ``load_state_dict`` runs, which may bring a new mask.

    The forward re-plans too, but not under :func:`torch.compile`, where the plan is part
    of the compiled code: replacing the plan after a load makes torch recompile.
    """
    hooks = module._load_state_dict_post_hooks
    if not any(hook is _replan_after_load for hook in hooks.values()):
        module.register_load_state_dict_post_hook(_replan_after_load)  # type: ignore[no-untyped-call]


def unwatch(module: nn.Module) -> None:
    """Undo :func:`watch`."""
    hooks = module._load_state_dict_post_hooks
    for key in [k for k, hook in hooks.items() if hook is _replan_after_load]:
        del hooks[key]


def empty_cache() -> None:
    """Free the buffers that ``execution="taps"`` keeps between calls on the CPU.

    With an input or gradient that is not channels-last, the taps path needs a few
    temporaries the size of a layer's input or output. It keeps the largest few (at most
    six) for the next call, because writing to freshly allocated large buffers costs a page
    fault every 4 KiB. They are freed by this, or taken up again by the next call.

    Example:
        >>> from maskparam.apply import apply_mask
        >>> from maskparam.masks import cross
        >>> conv = apply_mask(nn.Conv3d(16, 16, 3, padding=1), cross(3, ndim=3), execution="taps")
        >>> conv(torch.randn(1, 16, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])
        >>> empty_cache()
    """
    SCRATCH.clear()


def kernel_status() -> str:
    """``"ready"`` if the tap kernel runs here, else why not; builds it if need be.

    The kernel needs an x86-64 CPU with AVX-512 and a C compiler (``$CC``, else ``cc``); it
    is compiled once, at its first use, into ``$MASKPARAM_CACHE_DIR`` (by default
    ``~/.cache/maskparam``), in under a second. ``MASKPARAM_TAP_KERNEL=0`` switches it off.
    Without it, ``execution="taps"`` runs the boxes: the same results, more slowly.

    Example:
        >>> kernel_status()  # doctest: +SKIP
        'ready'
    """
    return _tap_kernel.status()


def _replan_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    from maskparam._forward import EXECUTION_ATTR

    execution = module.__dict__.get(EXECUTION_ATTR)
    mask = getattr(_outermost(module), "mask", None)
    if isinstance(execution, TapExecution) and isinstance(mask, Tensor):
        execution.refresh(module, mask)


def prepare(
    module: nn.Module, mask: Tensor, name: str, execution: Any, bias_mode: str = "keep"
) -> TapExecution | None:
    """Validate ``execution`` for :func:`~maskparam.apply_mask` and plan it; change nothing.

    Args:
        module: The module about to be masked.
        mask: Its validated bool mask.
        name: The parameter being masked.
        execution: ``"dense"``, ``"taps"`` or ``"auto"``.
        bias_mode: The ``bias_mode`` it is masked with.

    Returns:
        What to record on the module, or None when it runs dense.

    Raises:
        ValueError: If ``execution`` is unknown, or not ``"dense"`` for a ``name`` other
            than ``"weight"``.

    Warns:
        UserWarning: If ``execution="taps"`` cannot apply to this module, which runs dense.

    Example:
        >>> plan = prepare(nn.Conv1d(1, 1, 5), torch.tensor([1, 0, 1, 0, 1]), "weight", "taps")
        >>> plan
        TapExecution(mode='taps', active=3/5, boxes=1)
        >>> prepare(nn.Conv1d(1, 1, 5), torch.ones(5), "weight", "dense") is None
        True
    """
    if not isinstance(execution, str) or execution not in EXECUTIONS:
        raise ValueError(
            f"apply_mask expects execution to be one of {list(EXECUTIONS)}. Got {execution!r}."
        )
    if execution == "dense":
        return None
    if name != "weight":
        raise ValueError(
            f"execution={execution!r} changes how a conv computes with its masked weight, so "
            f"it needs name='weight'. Got name={name!r}; use execution='dense'."
        )
    kind = type(module).__name__
    reason = None
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        reason = f"it runs Conv1d, Conv2d and Conv3d, not {kind}"
    elif bias_mode in ("valid", "partial"):
        reason = f"bias_mode={bias_mode!r} runs its own convolutions"
    if reason is not None:
        if execution == "taps":
            _warn_fallback(module, reason, stacklevel=4)
        return None
    weight = getattr(module, name)
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        # Build (or load) the tap kernel now, in eager mode, not inside a torch.compile trace.
        _tap_kernel.library()
    plan = TapExecution(execution, spatial_support(mask, weight.shape))
    if plan.reason is not None and execution == "taps" and not plan.kernel_may_run(module):
        _warn_fallback(module, plan.reason, stacklevel=4)
    return plan


# -- running ---------------------------------------------------------------------------


def _warn_fallback(module: nn.Module, reason: str, stacklevel: int = 4) -> None:
    from torch.nn.utils import parametrize

    kind = parametrize.type_before_parametrizations(module).__name__
    warnings.warn(
        f"execution='taps' falls back to the dense convolution for this {kind}: {reason}.",
        UserWarning,
        stacklevel=stacklevel,
    )


def _outermost(module: nn.Module) -> nn.Module:
    """The last parametrization of ``module.weight``: the one that gives the weight."""
    return _checks.parametrizations_of(module, "weight")[-1]


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _unsupported(module: nn.Module, input: Tensor, weight: Tensor) -> str | None:
    """Why the boxes cannot run this call, or None."""
    from maskparam.parametrizations import FixedMask

    if input.device.type not in _DEVICES:
        return f"it runs on CPU and CUDA, not {input.device.type}"
    if not input.is_floating_point() or not weight.is_floating_point():
        return f"it needs floating-point input and weight, got {input.dtype} and {weight.dtype}"
    if _functorch_active():
        return "it does not run under torch.func transforms such as vmap and grad"
    if not isinstance(_outermost(module), FixedMask):
        return (
            "another parametrization comes after the mask, so masked taps need not be zero "
            "in the weight"
        )
    return None


def _run(
    path: str,
    module: nn.modules.conv._ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
) -> Tensor:
    dense = type(module)._maskparam_base._conv_forward  # type: ignore[attr-defined]
    if path == "dense":
        out: Tensor = dense(module, input, weight, bias)
        return out
    if path == "dense_cl":
        out_cl = is_channels_last(input) or is_channels_last(weight)
        y = dense(module, _relayout(input, True), weight, bias)
        return _relayout(y, out_cl)
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # As autocast runs a dense conv: in its lower precision, whatever the path inside.
        dtype = torch.get_autocast_dtype(device)

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

        with torch.autocast(device, enabled=False):
            return run_boxes(
                module, cast(input), cast(weight), None if bias is None else cast(bias), boxes
            )
    return run_boxes(module, input, weight, bias, boxes)


class _Geometry(NamedTuple):
    """A conv's options, per spatial axis, as the boxes need them."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    groups: int


def _geometry(module: nn.modules.conv._ConvNd, lift: bool) -> _Geometry:
    """The options of ``module``; for 1-D lifted to 2-D (``lift``) with a unit first axis.

    With a padding mode other than zeros, the input is padded before the boxes run, so
    they see no padding.
    """
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros" or module.padding == "valid":
        left = right = (0,) * nd
    elif module.padding == "same":  # an odd total puts the extra zero on the right, as torch
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        left = tuple(t // 2 for t in totals)
        right = tuple(t - t // 2 for t in totals)
    else:
        left = right = tuple(module.padding)  # type: ignore[arg-type]
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    if lift:
        return _Geometry((1, *stride), (1, *dilation), (0, *left), (0, *right), module.groups)
    return _Geometry(stride, dilation, left, right, module.groups)


class _Window(NamedTuple):
    """Where one box reads its input and how it pads it."""

    padded: bool  # read from the zero-padded input rather than the raw input
    start: tuple[int, ...]
    length: tuple[int, ...]
    padding: tuple[int, ...]  # symmetric padding given to the conv itself


def _window(box: Box, geo: _Geometry, in_size: Sequence[int], out_size: Sequence[int]) -> _Window:
    """The input window and padding that make ``box`` produce exactly ``out_size``.

    Output ``o`` of the dense conv reads raw input ``o * stride - pad_left + tap * dilation``.
    The box, a kernel of ``count`` taps at dilation ``step * dilation``, reads the same
    positions from a window that starts ``start * dilation - pad_left`` later. A conv can only
    pad symmetrically, and padding more than needed (then cropping the output) is slow; so a
    box uses the raw input when a symmetric padding gives exactly the right output, and
    otherwise a window of the input padded once, explicitly.
    """
    starts, lengths, pads = [], [], []
    for i, (a, n, q) in enumerate(zip(box.start, box.count, box.step, strict=True)):
        s, d, pl = geo.stride[i], geo.dilation[i], geo.pad_left[i]
        size, out = in_size[i], out_size[i]
        extent = (n - 1) * q * d + 1
        lp = pl - a * d
        start, p = (0, lp) if lp >= 0 else (-lp, 0)
        lo = (out - 1) * s + extent - 2 * p  # window lengths that give `out` outputs
        hi = lo + s - 1
        avail = size - start
        if lo <= avail <= hi:
            length = avail  # to the end: the conv's right padding is the dense padding
        elif p <= s - 1 and max(lo, lo + p) <= min(hi, avail):
            length = lo + p  # cropped, and no read lands in the conv's right padding
        else:
            return _padded_window(box, geo, out_size)
        starts.append(start)
        lengths.append(length)
        pads.append(p)
    return _Window(False, tuple(starts), tuple(lengths), tuple(pads))


def _padded_window(box: Box, geo: _Geometry, out_size: Sequence[int]) -> _Window:
    starts = tuple(a * d for a, d in zip(box.start, geo.dilation, strict=True))
    lengths = tuple(
        (out - 1) * s + (n - 1) * q * d + 1
        for out, s, n, q, d in zip(
            out_size, geo.stride, box.count, box.step, geo.dilation, strict=True
        )
    )
    return _Window(True, starts, lengths, (0,) * len(starts))


def run_boxes(
    module: nn.modules.conv._ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
) -> Tensor:
    """The conv of ``module`` on ``input``, computed box by box.

    ``weight`` must be zero outside the boxes; the result is then the dense convolution.

    Args:
        module: A Conv1d/2d/3d: its stride, padding, dilation, groups and padding mode.
        input: ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``.
        weight: The masked weight.
        bias: The bias or None.
        boxes: From :func:`decompose` of the weight's active taps, at least one.

    Returns:
        The output, in the layout the dense convolution gives.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
        >>> weight = torch.where(plus, torch.ones(1, 1, 3, 3), 0)
        >>> x = torch.arange(9.0).view(1, 1, 3, 3)
        >>> run_boxes(conv, x, weight, None, decompose(plus))
        tensor([[[[ 4.,  7.,  8.],
                  [13., 20., 19.],
                  [16., 25., 20.]]]])
        >>> torch.equal(_, F.conv2d(x, weight, padding=1))
        True
    """
    unbatched = input.dim() == len(module.kernel_size) + 1
    one_d = len(module.kernel_size) == 1
    x, w = _lift(input, weight)
    if module.padding_mode != "zeros":
        pad = module._reversed_padding_repeated_twice
        x = F.pad(x, [*pad, 0, 0] if one_d else pad, mode=module.padding_mode)
    # The layout the dense convolution gives: it sees the input after a padding mode's pad.
    out_cl = not one_d and (is_channels_last(x) or is_channels_last(weight))
    # Under torch.compile the plain function: tracing needs no cache, and warns about one.
    compiling = torch.compiler.is_compiling()
    plan = _layout.__wrapped__ if compiling else _layout
    layout = plan(boxes, _geometry(module, one_d), tuple(x.shape[2:]), tuple(w.shape[2:]), one_d)
    if x.device.type != "cpu" or (not compiling and _forward_ad_level() >= 0):
        y: Tensor = _composite(x, w, bias, layout, out_cl)
    elif _tap_kernel.applies(
        x, w, bias, layout.stride, layout.groups, layout.out_size, out_cl, _count(boxes)
    ):
        geo = _geometry(module, one_d)
        active = (_active_taps.__wrapped__ if compiling else _active_taps)(boxes, one_d)
        table = _tap_kernel.tap_table.__wrapped__ if compiling else _tap_kernel.tap_table
        offsets, index = table(active, tuple(w.shape[2:]), geo.dilation, geo.pad_left)
        if compiling:  # a custom op that torch.compile traces as one node
            y = _tap_kernel.compiled_conv(x, w, bias, offsets, index, layout.out_size)
        else:
            composite_args = (layout, out_cl, _composite)
            y = _tap_kernel.TapKernel.apply(  # type: ignore[no-untyped-call]
                x, w, bias, offsets, index, layout.out_size, composite_args
            )
    elif compiling:
        y = _composite(x, w, bias, layout, out_cl)
    else:
        y = FusedBoxes.apply(x, w, bias, layout, out_cl, _composite)  # type: ignore[no-untyped-call]
    if one_d:
        y = y.squeeze(2)
    return y.squeeze(0) if unbatched else y


def _count(boxes: tuple[Box, ...]) -> int:
    return sum(box.size for box in boxes)


def _lift(input: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Input and weight as the boxes see them: batched, and 1-D as 2-D with a height of one.

    2-D, because 1-D has no channels-last layout.
    """
    x = input.unsqueeze(0) if input.dim() == weight.dim() - 1 else input
    if weight.dim() == 3:
        return x.unsqueeze(2), weight.unsqueeze(2)
    return x, weight


def _kernel_takes(
    module: nn.modules.conv._ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
) -> bool:
    """Whether :func:`run_boxes` would run this call in the tap kernel (zeros padding)."""
    if module.padding_mode != "zeros" or not boxes:
        return False
    x, w = _lift(input, weight)
    geo = _geometry(module, weight.dim() == 3)
    out_size = _out_size(geo, tuple(x.shape[2:]), tuple(w.shape[2:]))
    out_cl = weight.dim() != 3 and (is_channels_last(x) or is_channels_last(weight))
    return _tap_kernel.applies(x, w, bias, geo.stride, geo.groups, out_size, out_cl, _count(boxes))


def _out_size(
    geo: _Geometry, in_size: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[int, ...]:
    """The conv's output size per spatial axis."""
    return tuple(
        (size + pl + pr - d * (k - 1) - 1) // s + 1
        for size, pl, pr, d, k, s in zip(
            in_size, geo.pad_left, geo.pad_right, geo.dilation, kernel, geo.stride, strict=True
        )
    )


@functools.lru_cache(maxsize=256)
def _active_taps(boxes: tuple[Box, ...], lift: bool) -> tuple[tuple[int, ...], ...]:
    """Every tap of ``boxes``, in order (``lift``: 1-D lifted to 2-D)."""
    taps = sorted(tap for box in boxes for tap in box.taps())
    return tuple((0, *tap) if lift else tuple(tap) for tap in taps)


def _composite(x: Tensor, w: Tensor, bias: Tensor | None, layout: Layout, out_cl: bool) -> Tensor:
    """The boxes as ordinary differentiable torch operations (any device, torch.compile).

    Args:
        x: Batched input, padded already for a padding mode other than zeros.
        w: The masked weight (1-D lifted to 2-D, like ``x``).
        bias: The bias or None.
        layout: From :func:`_layout`.
        out_cl: Whether the output is channels-last.
    """
    x = _relayout(x, True)
    padded = None if layout.pad is None else F.pad(x, layout.pad)
    conv = CONV[x.dim() - 2]
    y: Tensor | None = None
    for step in layout.steps:
        src = padded if step.padded else x
        assert src is not None
        part = conv(
            src if step.input_index is None else src[step.input_index],
            w[step.weight_index],
            bias if y is None else None,
            layout.stride,
            step.padding,
            step.dilation,
            layout.groups,
        )
        # The conv backward needs only its inputs, so summing in place is safe for autograd.
        # Dropping each part before the next conv lets that conv reuse its memory.
        y = part if y is None else y.add_(part)
        del part
    assert y is not None
    return _relayout(y, out_cl)


def _forward_ad_level() -> int:
    """The innermost forward-mode AD level, -1 outside ``torch.autograd.forward_ad``."""
    level: int = getattr(torch.autograd.forward_ad, "_current_level", -1)
    return level


@functools.lru_cache(maxsize=1024)
def _layout(
    boxes: tuple[Box, ...],
    geo: _Geometry,
    in_size: tuple[int, ...],
    kernel: tuple[int, ...],
    lift: bool,
) -> Layout:
    """Where each box reads and how it pads, for one input size (``lift``: 1-D as 2-D)."""
    if lift:
        boxes = tuple(Box((0, *b.start), (1, *b.count), (1, *b.step)) for b in boxes)
    out_size = _out_size(geo, in_size, kernel)
    everything = (slice(None), slice(None))
    padded_size = tuple(
        size + pl + pr for size, pl, pr in zip(in_size, geo.pad_left, geo.pad_right, strict=True)
    )
    steps = []
    for box in boxes:
        win = _window(box, geo, in_size, out_size)
        window = tuple(slice(a, a + n) for a, n in zip(win.start, win.length, strict=True))
        source = padded_size if win.padded else in_size
        whole = not win.padded and all(
            a == 0 and n == size for a, n, size in zip(win.start, win.length, in_size, strict=True)
        )
        dilation = tuple(d * q for d, q in zip(geo.dilation, box.step, strict=True))
        steps.append(
            Step(
                win.padded,
                None if whole else everything + window,
                everything + box.slices(),
                win.padding,
                dilation,
                _fold(box, win, source, geo.stride, dilation) if len(in_size) == 3 else None,
            )
        )
    pad = None
    if any(step.padded for step in steps):
        pairs = zip(reversed(geo.pad_left), reversed(geo.pad_right), strict=True)
        pad = tuple(p for pair in pairs for p in pair)
    return Layout(tuple(steps), pad, geo.stride, geo.groups, out_size)


def _fold(
    box: Box,
    win: _Window,
    source: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Fold | None:
    """How a 3-D box can run as a 2-D convolution on a view of its source, if it can."""

    def full(axis: int) -> bool:  # one tap, unit stride, no padding, the whole source axis
        return (
            box.count[axis] == 1
            and stride[axis] == 1
            and win.padding[axis] == 0
            and win.start[axis] == 0
            and win.length[axis] == source[axis]
        )

    if full(0):
        return Fold("depth", stride[1:], win.padding[1:], dilation[1:])  # type: ignore[arg-type]
    if full(1) and full(2):
        return Fold("plane", (stride[0], 1), (win.padding[0], 0), (dilation[0], 1))
    return None


# -- layouts -----------------------------------------------------------------------------


def _relayout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in channels-last (or contiguous) layout, with a backward that does the reverse.

    Torch's strided copy from channels-last to contiguous is several times slower than
    :func:`~maskparam._taps_kernels.copy_layout`, and autograd would run it for every box.
    """
    if t.is_contiguous(memory_format=memory_format(t, channels_last)):
        return t
    if torch.compiler.is_compiling() or t.dim() not in (4, 5) or _forward_ad_level() >= 0:
        # Tracing needs no faster copy; forward-mode AD needs ops with a forward derivative.
        return t.contiguous(memory_format=memory_format(t, channels_last))
    out: Tensor = _Relayout.apply(t, channels_last)  # type: ignore[no-untyped-call]
    return out


class _Relayout(torch.autograd.Function):
    # The ctx-first form: a separate setup_context makes every call bind its signature.
    @staticmethod
    def forward(ctx: Any, t: Tensor, channels_last: bool) -> Tensor:
        ctx.input_channels_last = is_channels_last(t)
        return copy_layout(t, channels_last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _relayout(grad, ctx.input_channels_last), None


# -- "auto" -------------------------------------------------------------------------------


def _measure(
    candidates: list[str],
    module: nn.modules.conv._ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
    backward: bool,
) -> dict[str, float]:
    """Seconds per call of each candidate path: the minimum of three interleaved rounds."""
    cuda = input.device.type == "cuda"

    def once(path: str) -> float:
        with torch.enable_grad() if backward else torch.no_grad():
            x = input.detach().requires_grad_(backward and input.requires_grad)
            w = weight.detach().requires_grad_(backward and weight.requires_grad)
            b = (
                None
                if bias is None
                else bias.detach().requires_grad_(backward and bias.requires_grad)
            )
            if cuda:
                torch.cuda.synchronize(input.device)
            start = time.perf_counter()
            y = _run(path, module, x, w, b, boxes)
            if backward:
                y.backward(y.detach())  # type: ignore[no-untyped-call]
            if cuda:
                torch.cuda.synchronize(input.device)
            return time.perf_counter() - start

    for path in candidates:  # warm-up: allocations, and the conv library's first-call setup
        once(path)
    times: dict[str, list[float]] = {path: [] for path in candidates}
    for _ in range(3):
        for path in candidates:
            times[path].append(once(path))
    return {path: min(ts) for path, ts in times.items()}
