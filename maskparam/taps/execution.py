"""The execution recorded on a conv: :class:`TapExecution`, and what apply_mask calls.

:func:`prepare` validates ``execution=`` and plans it; :func:`watch` re-plans after
``load_state_dict``. Each forward asks :func:`~maskparam.taps.choose.choose` for its path
and runs it (:mod:`maskparam.taps.paths`); :func:`explain` says which path, and why.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

from maskparam import _checks, _compat, _forward
from maskparam._forward import BIAS_MODE_ATTR, EXECUTION_ATTR
from maskparam.taps import kernel as tap_kernel
from maskparam.taps import paths
from maskparam.taps.boxes import MAX_BOXES, Box, decompose, spatial_support
from maskparam.taps.choose import Call, choose, outermost
from maskparam.taps.memory import SCRATCH

__all__ = [
    "EXECUTIONS",
    "Execution",
    "Explanation",
    "TapExecution",
    "empty_cache",
    "explain",
    "kernel_status",
    "prepare",
    "unwatch",
    "watch",
]

Execution = Literal["dense", "taps", "auto"]
"""How a masked conv runs, see :func:`maskparam.apply_mask`."""

EXECUTIONS: tuple[str, ...] = get_args(Execution)


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
    than CPU or CUDA, a dtype that is not floating point. Under :func:`torch.jit.trace` and
    :func:`torch.onnx.export` (TorchScript) it runs dense, silently: that is what they record.
    Each call's path comes from :data:`~maskparam.taps.choose.RULES`; :func:`explain` says
    which, and why.

    Args:
        mode: ``"taps"`` or ``"auto"``.
        support: Bool tensor of the kernel's spatial shape, from :func:`spatial_support`.

    Example:
        >>> import torch
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
            _warn_fallback(module, plan.reason)
        return plan

    def kernel_may_run(self, module: nn.Module) -> bool:
        """Whether a mask too fragmented for boxes may still run in the tap kernel.

        True if the layer's options and weight suit the kernel; whether it runs is then
        up to each call's input.
        """
        weight = getattr(module, "weight", None)
        return (
            bool(self.tap_boxes)
            and isinstance(module, _compat.ConvNd)
            and isinstance(weight, Tensor)
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and module.groups == 1
            and all(s == 1 for s in module.stride)
            and module.padding_mode == "zeros"
            and tap_kernel.library() is not None
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
        if seen is mask and self._seen_version == _compat.tensor_version(mask):
            return
        chain = cast(nn.ModuleDict, module.parametrizations)["weight"]
        weight_shape = cast(Tensor, chain.original).shape
        support = spatial_support(mask, weight_shape)
        if not torch.equal(support, self.support):
            self._plan(support)
        self._seen = weakref.ref(mask)
        self._seen_version = _compat.tensor_version(mask)

    def forward(
        self, module: _compat.ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """The layer's ``_conv_forward`` under this execution."""
        run = functools.partial(_run_candidate, module, self)
        choice = choose(Call(module, input, weight, bias, self, run=run))
        if choice.warns and self.mode == "taps":
            _warn_fallback(module, choice.reason)
        return paths.run(choice.path, module, input, weight, bias, choice.boxes)


def watch(module: nn.Module) -> None:
    """Re-plan ``module`` whenever ``load_state_dict`` runs, which may bring a new mask.

    The forward re-plans too, but not under :func:`torch.compile`, where the plan is part
    of the compiled code: replacing the plan after a load makes torch recompile.
    """
    hooks = _compat.load_state_dict_post_hooks(module)
    if not any(hook is _replan_after_load for hook in hooks.values()):
        module.register_load_state_dict_post_hook(_replan_after_load)  # type: ignore[no-untyped-call]


def unwatch(module: nn.Module) -> None:
    """Undo :func:`watch`."""
    hooks = _compat.load_state_dict_post_hooks(module)
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
    """``"ready (<isa>)"`` if the tap kernel runs here, else why not; builds it if need be.

    The kernel needs a CPU with AVX-512, AVX2 and FMA (x86-64) or NEON (ARM64), and a C
    compiler (``$CC``, else ``cc``); it is compiled once per instruction set, at its first
    use, into a private cache (``$MASKPARAM_CACHE_DIR``, by default ``~/.cache/maskparam``),
    in about a second, and a cached library is loaded only if maskparam can trust it.
    ``MASKPARAM_TAP_KERNEL=0`` switches it off and ``MASKPARAM_TAP_ISA`` forces an
    instruction set. Without it, ``execution="taps"`` runs the boxes: the same results, more
    slowly.

    Example:
        >>> kernel_status()  # doctest: +SKIP
        'ready (avx512)'
    """
    return tap_kernel.status()


def _replan_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    execution = module.__dict__.get(EXECUTION_ATTR)
    mask = getattr(outermost(module), "mask", None)
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
    kind = _checks.layer_class(module).__name__
    reason = None
    if not isinstance(module, _compat.ConvNd) or module.transposed:
        reason = f"it runs Conv1d, Conv2d and Conv3d, not {kind}"
    elif bias_mode in ("valid", "partial"):
        reason = f"bias_mode={bias_mode!r} runs its own convolutions"
    if reason is not None:
        if execution == "taps":
            _warn_fallback(module, reason)
        return None
    weight = getattr(module, name)
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        # Build (or load) the tap kernel now, in eager mode, not inside a torch.compile trace.
        tap_kernel.library()
    plan = TapExecution(execution, spatial_support(mask, weight.shape))
    if plan.reason is not None and execution == "taps" and not plan.kernel_may_run(module):
        _warn_fallback(module, plan.reason)
    return plan


def _run_candidate(
    module: _compat.ConvNd,
    plan: TapExecution,
    candidate: str,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """Run one of "auto"'s candidates: ``"dense"``, ``"dense_cl"`` or ``"taps"``."""
    if candidate != "taps":
        return paths.run(candidate, module, input, weight, bias, ())
    choice = choose(Call(module, input, weight, bias, plan, mode="taps"))
    return paths.run(choice.path, module, input, weight, bias, choice.boxes)


def _warn_fallback(module: nn.Module, reason: str) -> None:
    kind = _checks.layer_class(module).__name__
    _checks.warn_at_caller(
        f"execution='taps' falls back to the dense convolution for this {kind}: {reason}."
    )


@dataclass(frozen=True)
class Explanation:
    """Which path a layer takes for an input, and why; ``str()`` says it in a sentence.

    Attributes:
        path: ``"dense"``, ``"dense_cl"``, ``"kernel"``, ``"kernel_op"``, ``"fused"`` or
            ``"reference"``, see :func:`explain`.
        rule: The name of the rule in :data:`~maskparam.taps.choose.RULES` that chose it,
            or ``"execution"``/``"bias_mode"`` for a layer without active-tap execution.
        reason: Why, in words.
    """

    path: str
    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def explain(module: nn.Module, input: Tensor) -> Explanation:
    """Say which path ``module(input)`` takes, and why, without running the layer.

    The path is one of ``"dense"``, ``"dense_cl"`` (dense in channels-last layout, which
    ``execution="auto"`` may pick), ``"kernel"`` (the compiled tap kernel), ``"kernel_op"``
    (the same as a custom op, under :func:`torch.compile`), ``"fused"`` (the boxes on the
    CPU with a hand-written backward) and ``"reference"`` (the boxes as ordinary torch
    operations). It comes from the first rule of :data:`~maskparam.taps.choose.RULES` that
    holds. For ``execution="auto"``, the first call of a kind measures the candidates, as
    the forward would, and the layer then keeps that choice. The grad mode counts: call it
    as you call the layer.

    Args:
        module: Any module; a conv masked with ``execution="taps"``/``"auto"`` says most.
        input: The input the layer would get.

    Returns:
        An :class:`Explanation`; ``str()`` of it is one line.

    Example:
        >>> from maskparam.apply import apply_mask
        >>> from maskparam.masks import cross
        >>> conv = apply_mask(nn.Conv2d(2, 2, 3), cross(3, ndim=2), execution="taps")
        >>> explain(conv, torch.zeros(1, 2, 5, 5, dtype=torch.int64)).rule
        'dtype'
        >>> print(explain(conv, torch.zeros(1, 2, 5, 5, dtype=torch.int64)))
        dense: it needs floating-point input and weight, got torch.int64 and torch.float32
        >>> print(explain(nn.Conv2d(2, 2, 3), torch.zeros(1, 2, 5, 5)))
        dense: execution='dense' (the default): the layer's own convolution
    """
    if BIAS_MODE_ATTR in module.__dict__:
        mode = module.__dict__[BIAS_MODE_ATTR]
        return Explanation("dense", "bias_mode", f"bias_mode={mode!r} runs its own convolutions")
    execution = module.__dict__.get(EXECUTION_ATTR)
    if not isinstance(execution, TapExecution) or not isinstance(module, _compat.ConvNd):
        return Explanation(
            "dense", "execution", "execution='dense' (the default): the layer's own convolution"
        )
    weight, bias = module.weight, module.bias
    run = functools.partial(_run_candidate, module, execution)
    choice = choose(Call(module, input, weight, bias, execution, run=run))
    return Explanation(choice.path, choice.rule, choice.reason)


def _conv_forward(
    module: _compat.ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """The forward of a conv with an execution recorded (see :mod:`maskparam._forward`)."""
    execution = module.__dict__.get(EXECUTION_ATTR)
    if isinstance(execution, TapExecution):
        return execution.forward(module, input, weight, bias)
    return paths.dense(module, input, weight, bias)


_forward.register(EXECUTION_ATTR, _conv_forward)
