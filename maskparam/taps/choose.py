"""The choice of path for one call: a table of rules, the first that holds decides.

Each :class:`Rule` names a condition, the path it leads to (one of
:data:`~maskparam.taps.paths.PATHS`) and why; :data:`RULES` lists them in order, and
:func:`choose` walks the list. The choice is a function of the layer, the input and what
the layer recorded (its boxes, and the choice ``execution="auto"`` timed): it never times,
decomposes a mask or writes anything. :func:`maskparam.taps.explain` shows the rule a call
meets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from maskparam import _checks, _compat
from maskparam.parametrizations import FixedMask
from maskparam.taps import auto
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.boxes import Box
from maskparam.taps.plan import box_call, count

__all__ = [
    "AUTO_PENDING",
    "RULES",
    "Call",
    "Choice",
    "Recorded",
    "Rule",
    "box_path",
    "choose",
    "outermost",
    "tracing",
]

_DEVICES = ("cpu", "cuda")


class Recorded(Protocol):
    """What a layer recorded (a :class:`~maskparam.taps.TapExecution`), as the rules read it."""

    @property
    def mode(self) -> str: ...  # noqa: D102

    @property
    def boxes(self) -> tuple[Box, ...] | None: ...  # noqa: D102

    @property
    def tap_boxes(self) -> tuple[Box, ...]: ...  # noqa: D102

    @property
    def reason(self) -> str | None: ...  # noqa: D102

    @property
    def active_fraction(self) -> float: ...  # noqa: D102

    def chosen(self, signature: tuple[Any, ...]) -> str | None:
        """``execution="auto"``'s recorded choice for calls of this signature, or None."""


class Choice(NamedTuple):
    """The outcome of :func:`choose`: the path, the boxes it runs, and the rule that chose."""

    path: str
    boxes: tuple[Box, ...]
    rule: str
    reason: str
    warns: bool  # execution="taps" warns: it was asked for and runs dense


class Call:
    """The facts about one call that the rules read, each worked out at most once.

    Args:
        module: The conv.
        input: Its input.
        weight: The masked weight.
        bias: The bias or None.
        recorded: What the layer recorded, or None for a call of
            :func:`~maskparam.taps.run_boxes` with ``boxes``.
        boxes: The boxes when ``recorded`` is None.
        mode: ``"taps"`` or ``"auto"``; by default the recorded one.
    """

    def __init__(
        self,
        module: _compat.ConvNd,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        recorded: Recorded | None = None,
        boxes: tuple[Box, ...] | None = None,
        mode: str | None = None,
    ) -> None:
        self.module, self.input, self.weight, self.bias = module, input, weight, bias
        self.recorded = recorded
        self.mode = mode or ("taps" if recorded is None else recorded.mode)
        self.compiling = torch.compiler.is_compiling()
        self.device = input.device.type
        self._given = boxes
        self._kernel: tuple[tuple[Box, ...] | None, bool] | None = None
        self._memo: dict[str, Any] = {}  # not functools.cached_property: dynamo traces no lock

    def _once(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._memo:
            self._memo[name] = compute()
        return self._memo[name]

    @property
    def boxes(self) -> tuple[Box, ...] | None:
        """The boxes to run: the recorded ones, or those given.

        For a mask too fragmented for boxes that the kernel takes: its taps one by one.
        """
        boxes: tuple[Box, ...] | None = self._once("boxes", self._boxes)
        return boxes

    def _boxes(self) -> tuple[Box, ...] | None:
        if self.recorded is None:
            return self._given
        boxes = self.recorded.boxes
        if boxes is None and not self.compiling and self.kernel_takes(self.recorded.tap_boxes):
            return self.recorded.tap_boxes  # too fragmented for boxes; the kernel takes it
        return boxes

    def kernel_takes(self, boxes: tuple[Box, ...] | None) -> bool:
        """Whether the tap kernel runs this call with ``boxes`` (:func:`.kernel.takes`)."""
        if self._kernel is None or self._kernel[0] is not boxes:
            self._kernel = (boxes, self._kernel_takes(boxes))
        return self._kernel[1]

    def _kernel_takes(self, boxes: tuple[Box, ...] | None) -> bool:
        if not boxes or not tap_kernel.layer_takes(self.module, self.weight):
            return False
        call = box_call(self.module, self.input, self.weight, boxes)
        return tap_kernel.takes(
            self.module, call.x, call.w, self.bias, count(boxes), call.plan.out_size, call.out_cl
        )

    @property
    def needs_grad(self) -> bool:
        """Whether the call records a graph: gradients are enabled and wanted."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.input, self.weight, self.bias)
        )

    @property
    def signature(self) -> tuple[Any, ...]:
        """What ``execution="auto"``'s choice depends on besides the layer.

        In eager mode, the thread count too; torch.compile reads the choice without it.
        """
        signature = auto.signature(self.input, self.needs_grad)
        return signature if self.compiling else (*signature, torch.get_num_threads())

    @property
    def candidates(self) -> tuple[str, ...]:
        """The paths ``execution="auto"`` times for this call."""
        active = 1.0 if self.recorded is None else self.recorded.active_fraction
        return auto.candidates(self.module, self.input, active)

    @property
    def auto(self) -> str | None:
        """``execution="auto"``'s choice: ``"dense"``, ``"dense_cl"`` or ``"taps"``.

        The recorded one; else dense where there is nothing to time, or under
        :func:`torch.compile` (which times nothing); else None: not timed yet.
        """
        choice: str | None = self._once("auto", self._auto)
        return choice

    def _auto(self) -> str | None:
        chosen = None if self.recorded is None else self.recorded.chosen(self.signature)
        if chosen is None and (self.compiling or self.candidates == ("dense",)):
            return "dense"
        return chosen


class Rule(NamedTuple):
    """One row of :data:`RULES`: when ``holds``, the call runs ``path``, because ``why``."""

    name: str
    path: str
    holds: Callable[[Call], bool]
    why: Callable[[Call], str]
    warns: bool = False  # a fallback to dense that execution="taps" warns about


AUTO_PENDING = "auto: not timed"
"""The rule of a call ``execution="auto"`` has yet to time; its layer times it next."""


def tracing() -> bool:
    """Whether :func:`torch.jit.trace` or the TorchScript ONNX exporter is recording.

    They record tensor ops only: no autograd Function, no ctypes call, no data-dependent
    boxes. Dense is what they can record.
    """
    if torch.compiler.is_compiling():
        return False
    return bool(torch.jit.is_tracing()) or torch.onnx.is_in_onnx_export()  # type: ignore[attr-defined, no-untyped-call]


RULES: tuple[Rule, ...] = (
    Rule(
        "tracing",
        "dense",
        lambda c: tracing(),
        lambda c: "torch.jit.trace and torch.onnx.export record the dense convolution",
    ),
    Rule(
        "empty",
        "dense",
        lambda c: c.input.numel() == 0 or c.weight.numel() == 0,
        lambda c: "an empty input or weight (no input channels, say): nothing to skip",
    ),
    Rule(
        "device",
        "dense",
        lambda c: c.device not in _DEVICES,
        lambda c: f"it runs on CPU and CUDA, not {c.device}",
        warns=True,
    ),
    Rule(
        "dtype",
        "dense",
        lambda c: not (c.input.is_floating_point() and c.weight.is_floating_point()),
        lambda c: (
            f"it needs floating-point input and weight, got {c.input.dtype} and {c.weight.dtype}"
        ),
        warns=True,
    ),
    Rule(
        "functorch",
        "dense",
        lambda c: _compat.functorch_active(),
        lambda c: "it does not run under torch.func transforms such as vmap and grad",
        warns=True,
    ),
    Rule(
        "parametrization",
        "dense",
        lambda c: c.recorded is not None and not isinstance(outermost(c.module), FixedMask),
        lambda c: (
            "another parametrization comes after the mask, so masked taps need not be zero "
            "in the weight"
        ),
        warns=True,
    ),
    Rule(
        "no taps",
        "dense",
        lambda c: c.boxes == (),
        lambda c: "the mask has no active tap",
        warns=True,
    ),
    Rule(
        "fragmented",
        "dense",
        lambda c: c.boxes is None,
        lambda c: (
            c.recorded.reason
            if c.recorded is not None and c.recorded.reason
            else "its active taps need too many boxes"
        ),
        warns=True,
    ),
    Rule(
        "auto: dense",
        "dense",
        lambda c: c.mode == "auto" and c.auto == "dense",
        lambda c: (
            "execution='auto' keeps dense for this input: "
            + ("no timing under torch.compile" if c.compiling else "no path was clearly faster")
        ),
    ),
    Rule(
        AUTO_PENDING,
        "dense",
        lambda c: c.mode == "auto" and c.auto is None,
        lambda c: (
            "execution='auto' has not timed calls like this one yet: the layer's next call "
            "times the candidates and keeps the fastest"
        ),
    ),
    Rule(
        "auto: dense_cl",
        "dense_cl",
        lambda c: c.mode == "auto" and c.auto == "dense_cl",
        lambda c: "execution='auto' measured dense in channels-last layout fastest",
    ),
    Rule(
        "not CPU",
        "reference",
        lambda c: c.device != "cpu",
        lambda c: f"the boxes as ordinary torch operations on {c.device}",
    ),
    Rule(
        "forward AD",
        "reference",
        lambda c: not c.compiling and _compat.forward_ad_level() >= 0,
        lambda c: "forward-mode AD needs ordinary torch operations",
    ),
    Rule(
        "exporting",
        "reference",
        lambda c: c.compiling and torch.compiler.is_exporting(),
        lambda c: (
            "torch.export (and so torch.onnx.export) records the boxes as ordinary torch "
            "operations, which any runtime runs"
        ),
    ),
    Rule(
        "kernel under compile",
        "kernel_op",
        lambda c: c.compiling and c.kernel_takes(c.boxes),
        lambda c: "the tap kernel takes the call; under torch.compile, as one custom op",
    ),
    Rule(
        "kernel",
        "kernel",
        lambda c: c.kernel_takes(c.boxes),
        lambda c: f"the tap kernel takes the call: {tap_kernel.CONDITIONS}",
    ),
    Rule(
        "compiling",
        "reference",
        lambda c: c.compiling,
        lambda c: "torch.compile traces the boxes as ordinary torch operations",
    ),
    Rule(
        "CPU",
        "fused",
        lambda c: True,
        lambda c: "the boxes on the CPU, with the hand-written backward",
    ),
)
"""The rules ``choose`` walks, in order, for every call; the last always holds.

Each names a condition, the path it leads to and why (see :func:`maskparam.taps.explain`).
"""


def choose(call: Call) -> Choice:
    """The path for ``call``: that of the first rule in :data:`RULES` that holds."""
    for rule in RULES:
        if rule.holds(call):
            boxes = call.boxes if rule.path not in ("dense", "dense_cl") else ()
            return Choice(rule.path, boxes or (), rule.name, rule.why(call), rule.warns)
    raise AssertionError("the last rule always holds")  # pragma: no cover


def box_path(
    module: _compat.ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    boxes: tuple[Box, ...],
) -> str:
    """The box path :func:`choose` takes for boxes given directly (dense rules aside)."""
    call = Call(module, input, weight, bias, boxes=boxes)
    for rule in RULES:
        if rule.path not in ("dense", "dense_cl") and rule.holds(call):
            return rule.path
    raise AssertionError("the last rule always holds")  # pragma: no cover


def outermost(module: nn.Module) -> nn.Module:
    """The last parametrization of ``module.weight``: the one that gives the weight."""
    return _checks.parametrizations_of(module, "weight")[-1]
