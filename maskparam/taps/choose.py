"""The choice of path for one call: a table of rules, the first that holds decides.

Each :class:`Rule` names a condition, the path it leads to (one of
:data:`~maskparam.taps.paths.PATHS`) and why; :data:`RULES` lists them in order, and
:func:`choose` walks the list. :func:`maskparam.taps.explain` shows the rule a call meets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import Tensor, nn

from maskparam import _checks, _compat
from maskparam.parametrizations import FixedMask
from maskparam.taps import auto
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.boxes import Box
from maskparam.taps.memory import is_channels_last
from maskparam.taps.plan import box_plan, count, geometry, lift

__all__ = ["RULES", "Call", "Choice", "Plan", "Rule", "box_path", "choose", "outermost"]

_DEVICES = ("cpu", "cuda")


class Plan(Protocol):
    """What :class:`~maskparam.taps.TapExecution` gives the rules."""

    mode: str
    boxes: tuple[Box, ...] | None
    tap_boxes: tuple[Box, ...]
    reason: str | None
    _choices: dict[tuple[Any, ...], str]

    @property
    def active_fraction(self) -> float: ...  # noqa: D102

    def refresh(self, module: nn.Module, mask: Tensor) -> None: ...  # noqa: D102


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
        plan: The recorded execution, or None for a call of
            :func:`~maskparam.taps.run_boxes` with ``boxes``.
        boxes: The boxes when ``plan`` is None.
        run: Runs ``"dense"``, ``"dense_cl"`` or ``"taps"``, for the timing of ``"auto"``.
        mode: ``"taps"`` or ``"auto"``; by default the plan's.
    """

    def __init__(
        self,
        module: _compat.ConvNd,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: Plan | None,
        boxes: tuple[Box, ...] | None = None,
        run: auto.Runner | None = None,
        mode: str | None = None,
    ) -> None:
        self.module, self.input, self.weight, self.bias = module, input, weight, bias
        self.plan, self.run = plan, run
        self.mode = mode or ("taps" if plan is None else plan.mode)
        self.compiling = torch.compiler.is_compiling()
        self.device = input.device.type
        self._given = boxes
        self._boxes: tuple[Box, ...] | None = None
        self._planned = False
        self._auto: str | None = None
        self._kernel: tuple[tuple[Box, ...] | None, bool] | None = None

    def boxes(self) -> tuple[Box, ...] | None:
        """The boxes to run: the plan's, re-planned first if the mask changed.

        For a mask too fragmented for boxes that the kernel takes: its taps one by one.
        """
        if self._planned:
            return self._boxes
        self._planned = True
        if self.plan is None:
            self._boxes = self._given
            return self._boxes
        if not self.compiling:
            self.plan.refresh(self.module, cast(Tensor, outermost(self.module).mask))
        self._boxes = self.plan.boxes
        if self._boxes is None and not self.compiling and self.kernel_takes(self.plan.tap_boxes):
            self._boxes = self.plan.tap_boxes  # too fragmented for boxes; the kernel takes it
        return self._boxes

    def kernel_takes(self, boxes: tuple[Box, ...] | None) -> bool:
        """Whether the tap kernel runs this call with ``boxes``."""
        if self._kernel is None or self._kernel[0] is not boxes:
            self._kernel = (boxes, self._kernel_takes(boxes))
        return self._kernel[1]

    def _kernel_takes(self, boxes: tuple[Box, ...] | None) -> bool:
        # The kernel computes "same"-sized planes of unpadded input: zeros padding only.
        if not boxes or self.module.padding_mode != "zeros":
            return False
        x, w = lift(self.input, self.weight)
        one_d = self.weight.dim() == 3
        geo = geometry(self.module, one_d)
        plan_of = box_plan.__wrapped__ if self.compiling else box_plan  # cached in eager mode
        out_size = plan_of(boxes, geo, tuple(x.shape[2:]), tuple(w.shape[2:]), one_d).out_size
        out_cl = not one_d and (is_channels_last(x) or is_channels_last(self.weight))
        return tap_kernel.applies(
            x, w, self.bias, geo.stride, geo.groups, out_size, out_cl, count(boxes)
        )

    def auto(self) -> str | None:
        """``execution="auto"``'s measured choice for calls like this, None for ``"taps"``."""
        if self.mode != "auto":
            return None
        if self._auto is None:
            self._auto = _auto_choice(self)
        return self._auto


class Rule(NamedTuple):
    """One row of :data:`RULES`: when ``holds``, the call runs ``path``, because ``why``."""

    name: str
    path: str
    holds: Callable[[Call], bool]
    why: Callable[[Call], str]
    warns: bool = False  # a fallback to dense that execution="taps" warns about


def _tracing(c: Call) -> bool:
    # torch.jit.trace and the TorchScript ONNX exporter record tensor ops only: no autograd
    # Function, no ctypes call, no data-dependent plan. Dense is what they can record.
    if c.compiling:
        return False
    return bool(torch.jit.is_tracing()) or torch.onnx.is_in_onnx_export()  # type: ignore[attr-defined, no-untyped-call]


RULES: tuple[Rule, ...] = (
    Rule(
        "tracing",
        "dense",
        _tracing,
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
        lambda c: c.plan is not None and not isinstance(outermost(c.module), FixedMask),
        lambda c: (
            "another parametrization comes after the mask, so masked taps need not be zero "
            "in the weight"
        ),
        warns=True,
    ),
    Rule(
        "no taps",
        "dense",
        lambda c: c.boxes() == (),
        lambda c: "the mask has no active tap",
        warns=True,
    ),
    Rule(
        "fragmented",
        "dense",
        lambda c: c.boxes() is None,
        lambda c: (
            c.plan.reason
            if c.plan is not None and c.plan.reason
            else "its active taps need too many boxes"
        ),
        warns=True,
    ),
    Rule(
        "auto: dense",
        "dense",
        lambda c: c.auto() == "dense",
        lambda c: (
            "execution='auto' keeps dense for this input: "
            + ("no timing under torch.compile" if c.compiling else "no path was clearly faster")
        ),
    ),
    Rule(
        "auto: dense_cl",
        "dense_cl",
        lambda c: c.auto() == "dense_cl",
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
        lambda c: c.compiling and c.kernel_takes(c.boxes()),
        lambda c: "the tap kernel takes the call; under torch.compile, as one custom op",
    ),
    Rule(
        "kernel",
        "kernel",
        lambda c: c.kernel_takes(c.boxes()),
        lambda c: (
            "the tap kernel takes the call: CPU, float32, stride 1, one group, contiguous "
            "input, output planes the size of the input's"
        ),
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
            boxes = call.boxes() if rule.path not in ("dense", "dense_cl") else ()
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
    call = Call(module, input, weight, bias, None, boxes)
    for rule in RULES:
        if rule.path not in ("dense", "dense_cl") and rule.holds(call):
            return rule.path
    raise AssertionError("the last rule always holds")  # pragma: no cover


def outermost(module: nn.Module) -> nn.Module:
    """The last parametrization of ``module.weight``: the one that gives the weight."""
    return _checks.parametrizations_of(module, "weight")[-1]


def _auto_choice(c: Call) -> str:
    """``"dense"``, ``"dense_cl"`` or ``"taps"``: measured once per kind of call."""
    assert c.plan is not None
    module, input, weight, bias = c.module, c.input, c.weight, c.bias
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    signature = auto.signature(input, needs_grad, is_channels_last(input))
    if c.compiling:
        # No timing inside a trace: the choice eager mode made for this input, or dense.
        return c.plan._choices.get(signature, "dense")
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
        c.boxes(),
        torch.get_num_threads(),
    )
    candidates = ["dense"]
    batched = input.dim() == len(module.kernel_size) + 2
    if batched and len(module.kernel_size) >= 2 and not is_channels_last(input):
        candidates.append("dense_cl")
    if c.plan.active_fraction <= auto.MAX_ACTIVE:
        candidates.append("taps")
    assert c.run is not None
    choice = auto.decide(key, candidates, c.run, input, weight, bias, needs_grad)
    c.plan._choices[signature] = choice
    return choice
