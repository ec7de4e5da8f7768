"""The execution recorded on a conv: :class:`TapExecution`, and what apply_mask calls.

:func:`prepare` validates ``execution=`` and decomposes the mask; :func:`watch` decomposes
it again after ``load_state_dict``. Each forward asks :func:`~maskparam.taps.choose.choose`
for its path and runs it (:mod:`maskparam.taps.paths`); for ``execution="auto"`` it first
times the candidates of a kind of call it has not seen (:mod:`maskparam.taps.auto`) and
records the fastest. :func:`explain` says which path, and why, and never times anything.
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
from maskparam.taps import auto, paths
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.boxes import MAX_BOXES, Box, decompose, spatial_support
from maskparam.taps.choose import AUTO_PENDING, Call, Choice, choose, outermost, tracing
from maskparam.taps.memory import is_channels_last

__all__ = [
    "EXECUTIONS",
    "Execution",
    "Explanation",
    "TapExecution",
    "explain",
    "prepare",
    "unwatch",
    "watch",
]

Execution = Literal["dense", "taps", "auto"]
"""How a masked conv runs, see :func:`maskparam.apply_mask`."""

EXECUTIONS: tuple[str, ...] = get_args(Execution)


class TapExecution:
    """What ``apply_mask(..., execution=...)`` records on a conv: the mode and the boxes.

    The boxes are the :func:`decompose` of the mask's :func:`spatial_support`. They are
    decomposed again when the mask changes (:func:`~maskparam.set_mask`,
    ``load_state_dict``, ``.to()``, an in-place edit of the mask buffer), so they never go
    stale, and they pickle and deep-copy with the module. Under :func:`torch.compile` they
    are part of the compiled code: ``set_mask`` and ``load_state_dict`` make torch
    recompile, but an in-place edit of the mask buffer is seen only after the next call
    outside the compiled code.

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
      the actual input (``TapExecution.time``), and records the fastest; dense unless another
      takes at most 90% of its time. The choice of path only reads that record: under
      :func:`torch.compile` it uses the recorded choice, or dense.

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
        >>> execution = TapExecution("taps", torch.tensor([True, False, True]))
        >>> execution.boxes
        (Box(start=(0,), count=(2,), step=(2,)),)
    """

    def __init__(self, mode: str, support: Tensor) -> None:
        self.mode = mode
        self._decompose(support)

    def _decompose(self, support: Tensor) -> None:
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
        # "auto": the path timed fastest, per input signature (see auto.signature).
        self._choices: dict[tuple[Any, ...], str] = {}

    def for_mask(
        self, module: nn.Module, mask: Tensor, weight_shape: Sequence[int]
    ) -> TapExecution:
        """The execution of the same mode for a new ``mask``; warns as :func:`prepare` does."""
        execution = TapExecution(self.mode, spatial_support(mask, weight_shape))
        execution._warn_if_dense(module)
        return execution

    def _warn_if_dense(self, module: nn.Module) -> None:
        """Warn if ``"taps"`` runs dense whatever the input: no boxes, and no kernel either."""
        weight = getattr(module, "weight", None)
        if self.reason is None or self.mode != "taps":
            return
        if (
            self.tap_boxes
            and isinstance(weight, Tensor)
            and tap_kernel.layer_takes(module, weight)
        ):
            return  # too fragmented for boxes: the kernel may take it, call by call
        _warn_fallback(module, self.reason)

    def chosen(self, signature: tuple[Any, ...]) -> str | None:
        """``execution="auto"``'s recorded choice for calls of ``signature``, or None."""
        return self._choices.get(signature)

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
            self._decompose(self.support)

    def __repr__(self) -> str:
        n = "none" if self.boxes is None else len(self.boxes)
        return (
            f"TapExecution(mode={self.mode!r}, active={int(self.support.sum())}/"
            f"{self.support.numel()}, boxes={n})"
        )

    def refresh(self, module: nn.Module, mask: Tensor) -> None:
        """Decompose ``mask`` again if it is not the tensor, or version, last seen."""
        seen = self._seen() if self._seen is not None else None
        if seen is mask and self._seen_version == _compat.tensor_version(mask):
            return
        chain = cast(nn.ModuleDict, module.parametrizations)["weight"]
        weight_shape = cast(Tensor, chain.original).shape
        support = spatial_support(mask, weight_shape)
        if not torch.equal(support, self.support):
            self._decompose(support)
        self._seen = weakref.ref(mask)
        self._seen_version = _compat.tensor_version(mask)

    def forward(
        self, module: _compat.ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """The layer's ``_conv_forward`` under this execution."""
        call, choice = self._choose(module, input, weight, bias)
        if (
            choice.rule in _AUTO_RULES
            and not call.compiling
            and self.chosen(call.signature) is None
        ):
            self.time(call)
            call, choice = self._choose(module, input, weight, bias)
        if choice.warns and self.mode == "taps":
            _warn_fallback(module, choice.reason)
        return paths.run(choice.path, module, input, weight, bias, choice.boxes)

    def _choose(
        self, module: _compat.ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
    ) -> tuple[Call, Choice]:
        """The path of ``module(input)``, the boxes brought up to date with the mask first.

        Not while torch traces (the boxes are part of the compiled code, or of none), nor
        where the calls run dense whatever the boxes: a mask on the meta device, which has
        no values, or another parametrization after the mask.
        """
        mask = getattr(outermost(module), "mask", None)
        tracing_ = torch.compiler.is_compiling() or tracing()
        if not tracing_ and isinstance(mask, Tensor) and not mask.is_meta:
            self.refresh(module, mask)
        call = Call(module, input, weight, bias, self)
        return call, choose(call)

    def time(self, call: Call) -> str:
        """Time ``"auto"``'s candidates for calls like ``call``; record and return the fastest.

        A warm-up and three interleaved rounds of each on the actual input, once per kind of
        call: identical layers share the verdict (:func:`.auto.decide`).
        """
        module, weight, bias = call.module, call.weight, call.bias
        key = (
            call.signature,  # the thread count included
            type(module).__name__,
            tuple(weight.shape),
            is_channels_last(weight),
            bias is not None,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
            call.boxes,
        )
        run = functools.partial(self._run_candidate, module)
        choice = auto.decide(
            key, call.candidates, auto.Trial(run, call.input, weight, bias, call.needs_grad)
        )
        self._choices[call.signature] = choice
        # What torch.compile reads, which sees no thread count: the choice made last.
        self._choices[auto.signature(call.input, call.needs_grad)] = choice
        return choice

    def _run_candidate(
        self,
        module: _compat.ConvNd,
        candidate: str,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        """Run one of "auto"'s candidates: ``"dense"``, ``"dense_cl"`` or ``"taps"``."""
        if candidate != "taps":
            return paths.run(candidate, module, input, weight, bias, ())
        choice = choose(Call(module, input, weight, bias, self, mode="taps"))
        return paths.run(choice.path, module, input, weight, bias, choice.boxes)


_AUTO_RULES = ("auto: dense", AUTO_PENDING)
"""The rules an "auto" call meets before it is timed: dense, for now."""


def watch(module: nn.Module) -> None:
    """Decompose the mask again whenever ``load_state_dict`` runs, which may bring a new one.

    The forward does too, but not under :func:`torch.compile`, where the boxes are part of
    the compiled code: replacing them after a load makes torch recompile.
    """
    hooks = _compat.load_state_dict_post_hooks(module)
    if not any(hook is _replan_after_load for hook in hooks.values()):
        module.register_load_state_dict_post_hook(_replan_after_load)  # type: ignore[no-untyped-call]


def unwatch(module: nn.Module) -> None:
    """Undo :func:`watch`."""
    hooks = _compat.load_state_dict_post_hooks(module)
    for key in [k for k, hook in hooks.items() if hook is _replan_after_load]:
        del hooks[key]


def _replan_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    # Saved models name this hook: its name stays.
    execution = module.__dict__.get(EXECUTION_ATTR)
    mask = getattr(outermost(module), "mask", None)
    if isinstance(execution, TapExecution) and isinstance(mask, Tensor):
        execution.refresh(module, mask)


def prepare(
    module: nn.Module, mask: Tensor, name: str, execution: Any, bias_mode: str = "keep"
) -> TapExecution | None:
    """Validate ``execution`` for :func:`~maskparam.apply_mask` and decompose the mask.

    Changes nothing: the caller records what it returns.

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
        >>> prepare(nn.Conv1d(1, 1, 5), torch.tensor([1, 0, 1, 0, 1]), "weight", "taps")
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
    recorded = TapExecution(execution, spatial_support(mask, weight.shape))
    recorded._warn_if_dense(module)
    return recorded


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
    holds. It never times anything: for ``execution="auto"`` it reads the choice the layer
    recorded for such an input, and before the layer has timed one it says so (rule
    ``"auto: not timed"``; the layer's next call times the candidates). The grad mode
    counts: call it as you call the layer.

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
    _, choice = execution._choose(module, input, module.weight, module.bias)
    return Explanation(choice.path, choice.rule, choice.reason)


def _conv_forward(
    module: _compat.ConvNd, input: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """The forward of a conv with an execution recorded (see :mod:`maskparam._forward`)."""
    execution = module.__dict__.get(EXECUTION_ATTR)
    if isinstance(execution, TapExecution):
        return execution.forward(module, input, weight, bias)
    return _forward.dense_forward(module, input, weight, bias)


_forward.register(EXECUTION_ATTR, _conv_forward)
