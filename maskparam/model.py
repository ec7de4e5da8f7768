"""Masks on a whole model: apply many at once, or remove them all.

:func:`apply_masks` is all or nothing: it checks every layer before it masks any.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

from torch import Tensor, nn

from maskparam import _checks, _transaction, _walk, apply
from maskparam.apply import BiasMode, apply_mask, remove_mask
from maskparam.parametrizations import BiasMask
from maskparam.summary import LayerSummary, MaskSummary, mask_summary
from maskparam.taps import Execution

__all__ = [
    "Include",
    "LayerSummary",
    "MaskSummary",
    "apply_masks",
    "mask_summary",
    "remove_masks",
]

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
        >>> plus = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
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
    apply.check_options(bias_mode, execution, "apply_masks")
    targets = _selected(model, masks, include)
    if not targets:
        raise ValueError(
            "apply_masks masks at least one layer: a call that selects none is almost always "
            f"a wrong type, pattern or name. Got none from {_describe(masks, include)}."
        )
    for name, module, mask in targets:
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
    with _transaction.atomic(module for _, module, _ in targets):
        for name, module, mask in targets:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                apply_mask(module, mask, bias_mode=bias_mode, execution=execution)
            for warning in caught:  # Again, with the layer's name, which apply_mask lacks.
                _checks.warn_at_caller(f"{name!r}: {warning.message}", warning.category)
    return [name for name, _, _ in targets]


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
        >>> _ = apply_masks(model, [1, 0, 1], include=nn.Conv1d)
        >>> remove_masks(model)
        ['0', '1']
        >>> [type(m).__name__ for m in model], model[0].weight[0, 0, 1].item()
        (['Conv1d', 'Conv1d'], 0.0)
    """
    _checks.check_module(model, "remove_masks")
    apply.check_bake(bake, "remove_masks")
    unmasking: list[tuple[str, nn.Module, list[str]]] = []
    for name, module in _walk.layers(model):
        names = [t for t in _walk.masked_tensors(module) if not _held_by_weight(module, t)]
        for tensor_name in names:
            try:
                apply._check_removable(module, tensor_name, bake)
            except ValueError as err:
                raise ValueError(
                    f"remove_masks could not unmask {name!r}, so it unmasked nothing. {err}"
                ) from None
        if names:
            unmasking.append((name, module, names))
    with _transaction.atomic(module for _, module, _ in unmasking):
        for _, module, names in unmasking:
            for tensor_name in names:
                remove_mask(module, name=tensor_name, bake=bake)
    return [name for name, _, _ in unmasking]


# -- helpers ------------------------------------------------------------------------------


def _held_by_weight(module: nn.Module, tensor_name: str) -> bool:
    """Whether ``tensor_name`` is a bias that the weight's ``bias_mode`` masks (and removes)."""
    chain = _checks.parametrizations_of(module, tensor_name)
    return (
        tensor_name == "bias"
        and len(chain) == 1
        and isinstance(chain[0], BiasMask)
        and "weight" in _walk.masked_tensors(module)
    )


def _selected(
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
            picked = [(name, module, masks(name, module)) for name, module in _walk.layers(model)]
            return [(name, module, mask) for name, module, mask in picked if mask is not None]
        return _from_dict(model, masks)
    if include is None:
        raise ValueError(
            "apply_masks with a single mask needs include= to say which layers get it: layer "
            "types, name patterns, or both (for example include=nn.Conv2d). Got include=None."
        )
    chosen = _selector(include)
    return [(name, module, masks) for name, module in _walk.layers(model) if chosen(name, module)]


def _from_dict(model: nn.Module, masks: Mapping[Any, Any]) -> list[tuple[str, nn.Module, Any]]:
    names = [name for name, _ in _walk.layers(model)]
    picked: list[tuple[str, nn.Module, Any]] = []
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
            picked.append((name, module, mask))
    if unknown:
        suggest = []
        for name in unknown:
            close = difflib.get_close_matches(name, names, n=1)
            suggest.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise ValueError(
            "apply_masks expects the dict's keys to name modules of the model, as "
            f"model.named_modules() does. Got unknown names: {', '.join(suggest)}."
        )
    return picked


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
