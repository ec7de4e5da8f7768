"""Masks on a whole model: apply many at once, remove them all, and summarise them.

:func:`apply_masks` is all or nothing: it checks every layer before it masks any.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _transaction, apply
from maskparam.apply import BiasMode, apply_mask, remove_mask
from maskparam.parametrizations import BiasMask, FixedMask
from maskparam.taps import EXECUTIONS, Execution

__all__ = ["Include", "LayerSummary", "MaskSummary", "apply_masks", "mask_summary", "remove_masks"]

Predicate: TypeAlias = Callable[[str, nn.Module], bool]
"""A test ``(name, module) -> bool`` that selects modules, see :func:`apply_masks`."""

Include: TypeAlias = (
    type[nn.Module] | str | Predicate | Iterable[type[nn.Module] | str | Predicate]
)
"""Layer types, name patterns and/or predicates that select modules, see :func:`apply_masks`."""


def apply_masks(
    model: nn.Module,
    masks: Mapping[str, Any] | Callable[[str, nn.Module], Any] | Tensor | Any,
    *,
    bias_mode: BiasMode = "keep",
    include: Include | None = None,
    execution: Execution = "dense",
) -> list[str]:
    """Mask many layers of ``model`` at once with :func:`~maskparam.apply_mask`, or none.

    ``masks`` says which layers get which mask, in one of three forms:

    - a dict from qualified module name (as :meth:`~torch.nn.Module.named_modules` gives
      it, ``""`` for ``model`` itself) to mask; a value of None skips that name;
    - a callable ``(name, module) -> mask or None``, called for every module of ``model``
      (maskparam's own parametrization modules excepted); None skips the module;
    - a single mask, given to every module that ``include`` selects.

    ``include`` is layer types, :func:`fnmatch.fnmatchcase` patterns on the qualified name
    (``"layer1.*"``; ``*`` also matches dots), predicates ``(name, module) -> bool``, or a
    list that mixes them. A module is selected when it is an instance of one of the types
    (if any are given), its name matches one of the patterns (if any are given), and every
    predicate returns True for it: ``[nn.Conv2d, "layer3.*", "layer4.*"]`` selects the
    Conv2d layers inside ``layer3`` and ``layer4``. A predicate picks layers by anything
    else, such as their kernel size, so that a 3x3x3 mask skips the 2x2x2 down-sampling
    convs of a 3-D U-Net::

        include=lambda name, m: isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3)

    A predicate sees every module of ``model`` once, ``model`` itself included (name
    ``""``), with maskparam's own parametrization modules left out, and sees a masked
    layer as the instance of its original class that it still is.

    Every selected layer is checked before any is masked: if one fails, nothing is masked
    and the error names that layer. Each layer gets its own copy of its mask, so one tensor
    may be given to many layers.

    Args:
        model: The model whose layers to mask.
        masks: A dict, a callable or a single mask, see above. A mask is anything
            :func:`~maskparam.apply_mask` accepts.
        bias_mode: Passed to :func:`~maskparam.apply_mask` for every layer.
        include: Layer types, name patterns and/or predicates; only with a single mask,
            which needs it.
        execution: Passed to :func:`~maskparam.apply_mask` for every layer.

    Returns:
        The qualified names of the masked modules, in the order of
        :meth:`~torch.nn.Module.named_modules` (dict order for a dict).

    Warns:
        UserWarning: If a mask switches every tap of a layer off; the message names it.

    Raises:
        TypeError: If ``model`` is not a module, a dict key is not a str, or ``include``
            holds something other than module types, str patterns and predicates (a module
            instance, say).
        ValueError: If ``include`` is given with a dict or a callable, or missing with a
            single mask, if a dict names a module that does not exist or names one module
            twice, if nothing is selected, or if any selected layer cannot take its mask
            (the message names it; see :func:`~maskparam.apply_mask`; when ``include``
            selected a layer the mask does not fit, it also shows a predicate that skips
            such layers).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        >>> apply_masks(model, plus, include=nn.Conv2d)
        ['0', '2']
        >>> remove_masks(model)
        ['0', '2']
        >>> apply_masks(model, {"2": plus}, bias_mode="zero")
        ['2']
        >>> model[2].bias.abs().sum().item()
        0.0
    """
    _checks.check_module(model, "apply_masks")
    if bias_mode not in apply.BIAS_MODES:
        raise ValueError(
            f"apply_masks expects bias_mode to be one of {list(apply.BIAS_MODES)}. "
            f"Got {bias_mode!r}."
        )
    if execution not in EXECUTIONS:
        raise ValueError(
            f"apply_masks expects execution to be one of {list(EXECUTIONS)}. Got {execution!r}."
        )
    plan = _plan(model, masks, include)
    if not plan:
        raise ValueError(
            "apply_masks masks at least one layer: a call that selects none is almost always "
            f"a wrong type, pattern or name. Got none from {_describe(masks, include)}."
        )
    for name, module, mask in plan:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # apply_mask warns again below, with the name
                apply._prepare(module, mask, "weight", bias_mode, execution)
        except (TypeError, ValueError) as err:
            hint = _include_hint(module, mask) if include is not None else ""
            raise type(err)(
                f"apply_masks could not mask {name!r} ({_checks.layer_name(module)}), so it "
                f"masked nothing. {err}{hint}"
            ) from None
    # Inside the transaction: with warnings as errors, a warning masks nothing.
    with _transaction.atomic(module for _, module, _ in plan):
        for name, module, mask in plan:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                apply_mask(module, mask, bias_mode=bias_mode, execution=execution)
            for warning in caught:  # Again, with the layer's name, which apply_mask lacks.
                _checks.warn_at_caller(f"{name!r}: {warning.message}", warning.category)
    return [name for name, _, _ in plan]


def remove_masks(model: nn.Module, *, bake: bool = True) -> list[str]:
    """Remove every mask in ``model`` with :func:`~maskparam.remove_mask`, or none.

    Every masked tensor is checked first: if one cannot be unmasked, nothing is.

    Args:
        model: A model with masked layers (or none: then nothing happens).
        bake: If True, each tensor keeps its masked values; if False, it gets back the
            values stored under the mask. See :func:`~maskparam.remove_mask`.

    Returns:
        The qualified names of the modules that were unmasked, in the order of
        :meth:`~torch.nn.Module.named_modules`.

    Raises:
        TypeError: If ``model`` is not a module.
        ValueError: If a masked tensor carries other parametrizations as well, or a
            layer's mask cannot be removed this way (the message names the layer).

    Example:
        >>> model = nn.Sequential(nn.Conv1d(1, 1, 3), nn.Conv1d(1, 1, 3))
        >>> _ = apply_masks(model, torch.tensor([1, 0, 1]), include=nn.Conv1d)
        >>> remove_masks(model)
        ['0', '1']
        >>> [type(m).__name__ for m in model], model[0].weight[0, 0, 1].item()
        (['Conv1d', 'Conv1d'], 0.0)
    """
    _checks.check_module(model, "remove_masks")
    apply.check_bake(bake, "remove_masks")
    plan: list[tuple[str, nn.Module, list[str]]] = []
    for name, module in _layers(model):
        names = [t for t in _masked_tensors(module) if not _held_by_weight(module, t)]
        for tensor_name in names:
            try:
                apply._check_removable(module, tensor_name, bake)
            except ValueError as err:
                raise ValueError(
                    f"remove_masks could not unmask {name!r}, so it unmasked nothing. {err}"
                ) from None
        if names:
            plan.append((name, module, names))
    with _transaction.atomic(module for _, module, _ in plan):
        for _, module, names in plan:
            for tensor_name in names:
                remove_mask(module, name=tensor_name, bake=bake)
    return [name for name, _, _ in plan]


@dataclass(frozen=True)
class LayerSummary:
    """One masked layer in a :class:`MaskSummary`.

    A *tap* is one position of a conv kernel: a 3x3 kernel has 9. A tap is active when at
    least one of the layer's filters uses it, so for a mask of the kernel's spatial shape
    the active taps are the mask's True entries, and for a per-channel or per-element mask
    they are the kernel positions that any (output, input) channel pair keeps. Layers
    without a spatial kernel (Linear, say) have no taps: ``kernel`` and the tap counts are
    None. A parameter is one entry of any of the layer's own parameters (weight, bias, ...);
    it is active unless a mask holds it at zero.

    Attributes:
        name: Qualified module name.
        type: The layer's class name, such as ``"Conv2d"``.
        kernel: The kernel size, or None.
        active_taps: Kernel positions in use, or None.
        total_taps: Kernel positions, or None.
        active_params: Parameter entries not held at zero by a mask.
        total_params: Parameter entries.
    """

    name: str
    type: str
    kernel: tuple[int, ...] | None
    active_taps: int | None
    total_taps: int | None
    active_params: int
    total_params: int


@dataclass(frozen=True)
class MaskSummary:
    """What :func:`mask_summary` returns: one row per masked layer, with two totals.

    ``str(summary)`` (or ``print(summary)``) gives the table; the rows and the totals are
    plain data for code. The table ends with two rows: ``total``, the sums over the masked
    layers above it (:attr:`total`), and ``whole model``, the same counts over every
    parameter of the model, masked or not (:attr:`model_total`).

    Attributes:
        rows: One :class:`LayerSummary` per masked layer, in module order.
        model_total: The whole model as one row named ``"whole model"``: its taps over every
            conv layer (an unmasked layer uses all of its taps), its parameters over every
            parameter of the model (shared ones once), active unless a mask holds them at
            zero.
    """

    rows: tuple[LayerSummary, ...]
    model_total: LayerSummary

    @property
    def total(self) -> LayerSummary:
        """The column sums over the masked layers as a row named ``"total"``.

        Taps are summed only over layers with taps (None if there are none).
        """
        return _sum_rows("total", self.rows)

    def __str__(self) -> str:
        header = ("name", "type", "kernel", "active taps", "active params")
        lines = [
            header,
            *(_cells(row) for row in self.rows),
            _cells(self.total, total=True),
            _cells(self.model_total, total=True),
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = []
        for line in lines:
            left = [cell.ljust(width) for cell, width in zip(line[:3], widths[:3], strict=True)]
            right = [cell.rjust(width) for cell, width in zip(line[3:], widths[3:], strict=True)]
            text.append("  ".join(left + right).rstrip())
        return "\n".join(text)


def mask_summary(model: nn.Module) -> MaskSummary:
    """Summarise the masks in ``model``: active taps and parameters per masked layer.

    Two totals follow the rows: ``total`` over the masked layers, and ``whole model`` over
    every parameter of ``model``, masked or not, so the share of the whole network that a
    mask switches off is one line.

    Args:
        model: Any model; layers without a mask have no row but count in ``whole model``.

    Returns:
        A :class:`MaskSummary`: print it for a table, or read its ``rows``, ``total`` and
        ``model_total``.

    Raises:
        TypeError: If ``model`` is not a module.

    Example:
        >>> model = nn.Sequential(
        ...     nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(4, 2, bias=False), nn.Conv2d(2, 1, 1)
        ... )
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        >>> _ = apply_masks(model, {"0": plus, "2": torch.tensor([1, 1, 0, 0])})
        >>> summary = mask_summary(model)
        >>> print(summary)
        name         type    kernel  active taps  active params
        0            Conv2d  3x3             5/9  12/20 (60.0%)
        2            Linear  -                 -    4/8 (50.0%)
        total                                5/9  16/28 (57.1%)
        whole model                         6/10  19/31 (61.3%)
        >>> summary.total.active_params, summary.model_total.total_params
        (16, 31)
    """
    _checks.check_module(model, "mask_summary")
    rows: list[LayerSummary] = []
    others: list[LayerSummary] = []  # the unmasked layers, for the whole model's taps
    for name, module in _layers(model):
        (rows if _masked_tensors(module) else others).append(_summarise(name, module))
    masked = _sum_rows("total", rows)
    unmasked = _sum_rows("", others)
    # Parameters by identity, so a shared one counts once; a mask hides only its own layer's.
    total_params = sum(p.numel() for p in model.parameters())
    hidden = masked.total_params - masked.active_params
    taps = [row for row in (masked, unmasked) if row.total_taps is not None]
    model_total = LayerSummary(
        name="whole model",
        type="",
        kernel=None,
        active_taps=sum(row.active_taps or 0 for row in taps) if taps else None,
        total_taps=sum(row.total_taps or 0 for row in taps) if taps else None,
        active_params=total_params - hidden,
        total_params=total_params,
    )
    return MaskSummary(tuple(rows), model_total)


# -- helpers ------------------------------------------------------------------------------


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the modules that parametrize registers inside a layer."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module._modules.items()
            if child is not None
            and not (child_name == "parametrizations" and parametrize.is_parametrized(module))
        ]
        stack.extend(reversed(children))


def _masked_tensors(module: nn.Module) -> list[str]:
    """The names of ``module``'s tensors that carry a :class:`FixedMask`."""
    if not parametrize.is_parametrized(module):
        return []
    return [
        tensor_name
        for tensor_name in module.parametrizations  # type: ignore[union-attr]
        if apply.is_masked(module, tensor_name)
    ]


def _held_by_weight(module: nn.Module, tensor_name: str) -> bool:
    """Whether ``tensor_name`` is a bias that the weight's ``bias_mode`` masks (and removes)."""
    chain = _checks.parametrizations_of(module, tensor_name)
    return (
        tensor_name == "bias"
        and len(chain) == 1
        and isinstance(chain[0], BiasMask)
        and "weight" in _masked_tensors(module)
    )


def _plan(
    model: nn.Module, masks: object, include: Include | None
) -> list[tuple[str, nn.Module, Any]]:
    """The (name, module, mask) triples that ``masks`` and ``include`` ask for; checks them."""
    if isinstance(masks, Mapping) or callable(masks):
        if include is not None:
            raise ValueError(
                "apply_masks takes include only with a single mask: a dict names its layers "
                f"and a callable picks them. Got include={include!r} with a "
                f"{'dict' if isinstance(masks, Mapping) else 'callable'}."
            )
        if callable(masks):
            picked = [(name, module, masks(name, module)) for name, module in _layers(model)]
            return [(name, module, mask) for name, module, mask in picked if mask is not None]
        return _from_dict(model, masks)
    if include is None:
        raise ValueError(
            "apply_masks with a single mask needs include= to say which layers get it: layer "
            "types, name patterns, or both (for example include=nn.Conv2d). Got include=None."
        )
    selected = _selector(include)
    return [(name, module, masks) for name, module in _layers(model) if selected(name, module)]


def _from_dict(model: nn.Module, masks: Mapping[Any, Any]) -> list[tuple[str, nn.Module, Any]]:
    names = [name for name, _ in _layers(model)]
    plan: list[tuple[str, nn.Module, Any]] = []
    unknown: list[str] = []
    first_name: dict[int, str] = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(
                "apply_masks expects the dict's keys to be qualified module names (str). "
                f"Got {name!r} of type {type(name).__name__}."
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            unknown.append(name)
            continue
        if id(module) in first_name:
            raise ValueError(
                "apply_masks expects each module at most once. Got the same module under "
                f"{first_name[id(module)]!r} and {name!r}."
            )
        first_name[id(module)] = name
        if mask is not None:
            plan.append((name, module, mask))
    if unknown:
        suggest = []
        for name in unknown:
            close = difflib.get_close_matches(name, names, n=1)
            suggest.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise ValueError(
            "apply_masks expects the dict's keys to name modules of the model, as "
            f"model.named_modules() does. Got unknown names: {', '.join(suggest)}."
        )
    return plan


def _selector(include: object) -> Callable[[str, nn.Module], bool]:
    """A test ``(name, module) -> bool`` for the modules that ``include`` selects."""
    items: list[object]
    if isinstance(include, (type, str)) or _is_predicate(include):
        items = [include]
    elif isinstance(include, Iterable) and not isinstance(include, nn.Module):
        items = list(include)
    else:
        items = [include]
    bad = [
        item
        for item in items
        if not (
            isinstance(item, str)
            or (isinstance(item, type) and issubclass(item, nn.Module))
            or _is_predicate(item)
        )
    ]
    if bad or not items:
        held = f", which holds {bad[0]!r}" if bad and bad[0] is not include else ""
        raise TypeError(
            "apply_masks expects include to be module types (such as nn.Conv2d), name "
            "patterns (such as 'layer1.*'), predicates (name, module) -> bool, or a "
            f"non-empty list of them. Got {include!r}{held}."
        )
    types = tuple(item for item in items if isinstance(item, type))
    patterns = [item for item in items if isinstance(item, str)]
    predicates = [item for item in items if _is_predicate(item)]

    def selected(name: str, module: nn.Module) -> bool:
        return (
            (not types or isinstance(module, types))
            and (not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns))
            and all(bool(predicate(name, module)) for predicate in predicates)  # type: ignore[operator]
        )

    return selected


def _is_predicate(item: object) -> bool:
    """Whether ``item`` is a function-like predicate: callable, but no type and no module."""
    return callable(item) and not isinstance(item, (type, nn.Module))


def _include_hint(module: nn.Module, mask: object) -> str:
    """How to leave out the layers a mask does not fit, when it does not fit ``module``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return ""
    try:
        as_bool = _checks.as_bool_mask(mask, "apply_masks")
    except (TypeError, ValueError):
        return ""
    if _checks.mask_fits(as_bool, weight):
        return ""
    kind = _checks.layer_name(module)
    kernel = getattr(module, "kernel_size", None)
    shape = tuple(as_bool.shape)
    if isinstance(kernel, tuple) and as_bool.dim() == len(kernel):
        test = f"isinstance(m, nn.{kind}) and m.kernel_size == {shape}"
    elif 1 not in shape:  # then the mask fits exactly the weights whose trailing dims it has
        test = f"isinstance(m, nn.{kind}) and m.weight.shape[-{len(shape)}:] == {shape}"
    else:  # a broadcasting mask: no one-line test says which weights it fits
        return (
            " To mask only the layers the mask fits, give include a predicate "
            "(name, module) -> bool that selects them."
        )
    return (
        " To mask only the layers the mask fits, select them with a predicate, such as "
        f"include=lambda name, m: {test}."
    )


def _describe(masks: object, include: object) -> str:
    if isinstance(masks, Mapping):
        return f"a dict with keys {list(masks)}"
    if callable(masks):
        return "the callable, which returned None for every module"
    return f"include={include!r}"


def _summarise(name: str, module: nn.Module) -> LayerSummary:
    kernel: tuple[int, ...] | None = None
    active_taps = total_taps = None
    if isinstance(module, _compat.ConvNd):
        kernel = tuple(module.kernel_size)
        total_taps = 1
        for size in kernel:
            total_taps *= size
        weight_mask = _combined_mask(module, "weight")
        if weight_mask is None:
            active_taps = total_taps
        else:
            # Weight is (out, in / groups, *kernel), or (in, out / groups, *kernel) transposed.
            active_taps = int(weight_mask.flatten(0, 1).any(dim=0).sum())
    active = total = 0
    for tensor in module._parameters.values():
        if tensor is not None:
            active += tensor.numel()
            total += tensor.numel()
    if parametrize.is_parametrized(module):
        chains: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
        for tensor_name, chain in chains.items():
            size = sum(p.numel() for p in chain.parameters(recurse=False))
            total += size
            mask = _combined_mask(module, tensor_name)
            active += size if mask is None else int(mask.sum())
    return LayerSummary(
        name=name,
        type=_checks.layer_class(module).__name__,
        kernel=kernel,
        active_taps=active_taps,
        total_taps=total_taps,
        active_params=active,
        total_params=total,
    )


def _sum_rows(name: str, rows: Iterable[LayerSummary]) -> LayerSummary:
    """The column sums of ``rows`` as one row; taps only over the rows that have taps."""
    rows = list(rows)
    taps = [r for r in rows if r.total_taps is not None]
    return LayerSummary(
        name=name,
        type="",
        kernel=None,
        active_taps=sum(r.active_taps or 0 for r in taps) if taps else None,
        total_taps=sum(r.total_taps or 0 for r in taps) if taps else None,
        active_params=sum(r.active_params for r in rows),
        total_params=sum(r.total_params for r in rows),
    )


def _combined_mask(module: nn.Module, tensor_name: str) -> Tensor | None:
    """The masks on ``module.<tensor_name>``, combined and expanded to its full shape."""
    chain = _checks.parametrizations_of(module, tensor_name)
    masks = [p.mask for p in chain if isinstance(p, FixedMask)]
    if not masks:
        return None
    shape = module.parametrizations[tensor_name].original.shape  # type: ignore[index, union-attr]
    combined = torch.ones(shape, dtype=torch.bool, device=masks[0].device)
    for mask in masks:
        combined &= mask.to(combined.device)
    return combined


def _cells(row: LayerSummary, *, total: bool = False) -> tuple[str, ...]:
    kernel = "x".join(map(str, row.kernel)) if row.kernel is not None else "-"
    taps = f"{row.active_taps}/{row.total_taps}" if row.total_taps is not None else "-"
    share = f" ({100 * row.active_params / row.total_params:.1f}%)" if row.total_params else ""
    params = f"{row.active_params}/{row.total_params}{share}"
    if total:
        return (row.name, "", "", taps, params)
    return (row.name, row.type, kernel, taps, params)
