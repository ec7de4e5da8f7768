"""The class a masked module gets: one of its own, safe to deepcopy and to pickle.

:func:`torch.nn.utils.parametrize.register_parametrization` swaps a module's class for a
generated subclass that carries a property per parametrized tensor. Three things go wrong
with that class, and this module fixes them:

- ``copy.deepcopy`` gives the copy the *same* generated class, so removing a
  parametrization from the copy deletes the property from the original too;
- the property's cache key is the id of the module it was made for, so inside
  :func:`~torch.nn.utils.parametrize.cached` a copy would read the original's weight;
- the class cannot be pickled, so ``torch.save(model)`` is refused.

:func:`adopt` gives a module a fresh class with fresh properties; the copy and unpickle
paths call it again for the new instance. The class also loads checkpoints the way users
expect: a plain one (``conv.weight``) keeps the module's own masks, a masked one brings its
masks along.

Each class made here records the module's own class as ``_maskparam_base``. Code that needs
that class (to call its ``_conv_forward``, say) reads ``type(module)._maskparam_base``, not
``type(module).__bases__[0]``: a wrapper may subclass the class again, as FSDP2's
``fully_shard`` does (its bases are ``(FSDPModule, ParametrizedConv2d)``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _forward, _optim, _transaction
from maskparam.parametrizations import (
    BiasMask,
    FixedMask,
    channel_activity,
)

__all__ = ["adopt", "record_parameter_order", "restore_parameter_order"]


def adopt(module: nn.Module, base: type[nn.Module] | None = None) -> None:
    """Give a parametrized ``module`` a class of its own, derived from ``base``.

    Args:
        module: A module with at least one parametrization.
        base: Its class before parametrization; found from the module when omitted.
    """
    if base is None:
        base = parametrize.type_before_parametrizations(module)
    namespace: dict[str, Any] = {
        "__deepcopy__": _deepcopy,
        "__reduce_ex__": _reduce_ex,
        "_load_from_state_dict": _load_from_state_dict,
        "_maskparam_base": base,
    }
    if callable(getattr(base, "reset_parameters", None)):
        namespace["reset_parameters"] = _reset_parameters
    if _forward.needs_override(module):
        namespace["_conv_forward"] = _forward.conv_forward
    module.__class__ = type(f"Parametrized{base.__name__}", (base,), namespace)
    for tensor_name in module.parametrizations:  # type: ignore[union-attr]
        # The same property torch installs, bound to this instance (its cache key is the id).
        _compat.inject_property(module, tensor_name)
    _optim.track(module)


def record_parameter_order(module: nn.Module) -> None:
    """Remember the order of ``module``'s own parameters before a mask first moves one."""
    module.__dict__.setdefault(PARAMETER_ORDER_ATTR, tuple(module._parameters))


def restore_parameter_order(module: nn.Module) -> None:
    """Put ``module``'s own parameters back in their recorded order, once none is masked.

    parametrize re-registers an unparametrized tensor after the others, so without this a
    conv's ``named_parameters()`` would become ``[bias, weight]``, and an optimizer state
    saved before masking would load each tensor's state into another one.
    """
    if parametrize.is_parametrized(module):
        return
    order = module.__dict__.pop(PARAMETER_ORDER_ATTR, None)
    if order is None:
        return
    params = module._parameters
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(params.items(), key=lambda item: rank.get(item[0], len(rank)))
    params.clear()
    params.update(ordered)


PARAMETER_ORDER_ATTR = "_maskparam_parameter_order"


def _base_of(module: nn.Module) -> type[nn.Module]:
    base: type[nn.Module] = type(module)._maskparam_base  # type: ignore[attr-defined]
    return base


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    base = _base_of(self)
    replica: nn.Module = base.__new__(base)
    memo[id(self)] = replica
    replica.__dict__.update(copy.deepcopy(self.__dict__, memo))
    adopt(replica, base)
    return replica


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # Pickle as (original class, state) so that loading needs no generated class.
    state = self.__getstate__()  # type: ignore[no-untyped-call]
    return (_rebuild, (_base_of(self), state))


def _rebuild(base: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    module: nn.Module = base.__new__(base)
    module.__setstate__(state)  # type: ignore[no-untyped-call]
    read_0_1_pickle(module)
    adopt(module, base)
    return module


def read_0_1_pickle(module: nn.Module) -> None:
    """Put the values a pickle kept in ``FixedMask.hidden`` into the original.

    Reads files written by maskparam 0.1.x; may be dropped in 1.0.
    """
    chains: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
    for chain in chains.values():
        parametrizations: list[nn.Module] = list(chain)  # type: ignore[call-overload]
        original: Tensor = chain.original  # type: ignore[assignment]
        for position, fixed in enumerate(parametrizations):
            if not isinstance(fixed, FixedMask):
                continue
            hidden = fixed.__dict__.pop("hidden", None)
            if position == 0 and isinstance(hidden, Tensor):
                with torch.no_grad():
                    original.copy_(torch.where(fixed.values, original, hidden))


def _reset_parameters(self: nn.Module) -> None:
    """The layer's own ``reset_parameters``, applied to the stored originals.

    The base class initialises ``self.weight`` in place, which on a masked layer is a tensor
    computed on access: the values would go nowhere. Here the base class runs on the stored
    tensors, so they are re-initialised as on a plain layer; the masks keep masked taps zero.
    """
    base, cls = _base_of(self), type(self)
    chains: nn.ModuleDict = self.parametrizations  # type: ignore[assignment]
    exposed = [name for name, chain in chains.items() if "original" in chain._parameters]
    try:
        self.__class__ = base  # no properties: self.weight finds _parameters["weight"]
        for name in exposed:
            self._parameters[name] = chains[name].original  # type: ignore[assignment]
        base.reset_parameters(self)  # type: ignore[attr-defined]
    finally:
        for name in exposed:
            self._parameters.pop(name, None)
        self.__class__ = cls


def _load_from_state_dict(
    self: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # Runs before the module's children load, on a copy of the checkpoint that torch lets
    # modules edit, so rewriting keys here decides what the parametrizations receive.
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    _optim.release(self)  # what this load writes is newer than any held value
    _adapt_masked_keys(self, state_dict, prefix, assign, error_msgs)
    _check_plain_parameters(self, state_dict, prefix, error_msgs)
    if assign:
        _optim.mark_stale()  # the originals become the checkpoint's tensors
    _base_of(self)._load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    )


def _adapt_masked_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, assign: bool, errors: list[str]
) -> None:
    """Fit the checkpoint's entries for every masked tensor of ``module`` to its masks.

    A plain checkpoint holds ``<prefix><name>``: it becomes the stored original and the
    module keeps its masks; the checkpoint's values at masked entries stay stored, so
    ``remove_mask(bake=False)`` gives the pretrained values back. A masked checkpoint holds
    the original and its masks: each mask is checked to be 0/1 and to fit, then replaces
    the module's mask, whatever shape it has (the kernel's, per channel, per element). A
    checkpoint of maskparam 0.1 also holds the values its masks hid, which go back into the
    original. A bias that ``bias_mode`` holds follows the weight's mask that results, never
    the checkpoint's.

    Everything is checked before anything changes: a tensor whose entries do not fit
    leaves this module's masks and weights as they were, and its error names the key.
    With ``assign=True`` the masks land on the checkpoint's device.
    """
    chains: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
    weight_first = sorted(chains.items(), key=lambda item: item[0] != "weight")
    loads: list[_MaskedLoad] = []
    for tensor_name, chain in weight_first:
        if not all(isinstance(p, FixedMask) for p in chain):  # type: ignore[attr-defined]
            continue
        follows = None
        first = next(iter(chain))  # type: ignore[call-overload]
        if tensor_name == "bias" and isinstance(first, BiasMask):
            weight = next((load for load in loads if load.tensor_name == "weight"), None)
            follows = _bias_follows(module, first, weight)
        loads.append(_MaskedLoad(chain, prefix, tensor_name, state_dict, assign, follows))
    problems = [problem for load in loads for problem in load.problems]
    if problems or any(load.blocked for load in loads):
        errors.extend(problems)
        for load in loads:
            load.keep_module_state(state_dict, keep_original=bool(problems))
        return
    # The weight's masks and the bias masks that follow them change together: a Ctrl-C
    # waits until all are in, and any other failure puts every mask back.
    before = [
        (fixed, fixed.mask, fixed.__dict__.get("_meta_values"))
        for load in loads
        for fixed in load.fixed
    ]
    with _transaction.sigint_held():
        try:
            for load in loads:
                load.commit(state_dict)
        except BaseException:
            for fixed, mask, values in before:
                fixed.mask = mask
                if values is None:
                    fixed.__dict__.pop("_meta_values", None)
                else:
                    fixed.__dict__["_meta_values"] = values
            raise


def _check_plain_parameters(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, errors: list[str]
) -> None:
    """Say why a checkpoint whose tensor is masked cannot load into a plain one here.

    A model masked with ``bias_mode="keep"`` has a plain bias, while a checkpoint saved with
    ``"zero"`` or ``"channel"`` holds a masked one: torch alone would only report a missing
    ``bias`` and unexpected ``parametrizations.bias`` keys. Like a size mismatch, this is an
    error with ``strict=False`` too: the checkpoint has the tensor, in a form that does not fit.
    """
    kind = _checks.layer_name(module)
    for name in module._parameters:
        masked = f"{prefix}parametrizations.{name}.original"
        if f"{prefix}{name}" in state_dict or masked not in state_dict:
            continue
        if name == "bias":
            errors.append(
                f"While loading {prefix}bias: the checkpoint holds a masked bias ({masked!r}), "
                "as saved by bias_mode='zero' or 'channel', but this model's "
                f"{kind}.bias is a plain parameter (bias_mode='keep'). Mask the model with "
                "the checkpoint's bias_mode, or load bake_state_dict(checkpoint), whose bias "
                "is plain."
            )
        else:
            errors.append(
                f"While loading {prefix}{name}: the checkpoint holds a masked {name} "
                f"({masked!r}), but this model's {kind}.{name} is not masked. Mask it the "
                "same way, or load bake_state_dict(checkpoint), which holds plain tensors."
            )


def _bias_follows(
    module: nn.Module, bias_mask: BiasMask, weight: _MaskedLoad | None
) -> Tensor | None:
    """The bias mask that ``bias_mode`` derives from the weight's mask after this load."""
    if bias_mask.mode == "zero":
        return torch.zeros_like(bias_mask.values)
    if weight is None or weight.blocked or weight.problems:
        return bias_mask.values
    original: Tensor = weight.chain.original  # type: ignore[assignment]
    return channel_activity(module, original.shape, weight.new_masks[0])


class _MaskedLoad:
    """What a checkpoint brings for one masked tensor, checked; applied only by commit()."""

    def __init__(
        self,
        chain: nn.Module,
        prefix: str,
        tensor_name: str,
        state_dict: dict[str, Any],
        assign: bool,
        follows: Tensor | None,
    ) -> None:
        self.chain, self.tensor_name, self.assign = chain, tensor_name, assign
        self.fixed: list[FixedMask] = list(chain)  # type: ignore[call-overload]
        self.base = f"{prefix}parametrizations.{tensor_name}."
        self.original_key = f"{self.base}original"
        self.plain_key = plain_key = f"{prefix}{tensor_name}"
        self.problems: list[str] = []
        self.blocked = False  # torch itself will refuse the original: change nothing here
        self.plain = plain_key in state_dict and self.original_key not in state_dict
        if self.plain:
            state_dict[self.original_key] = state_dict.pop(plain_key)
        original: Tensor = chain.original  # type: ignore[assignment]
        self.shape = tuple(original.shape)
        incoming = state_dict.get(self.original_key)
        if incoming is not None and (
            not isinstance(incoming, Tensor) or tuple(incoming.shape) != self.shape
        ):
            self.blocked = True
        self.incoming: Tensor | None = incoming if isinstance(incoming, Tensor) else None
        self.new_masks = [
            self._incoming_mask(state_dict, i, fixed) for i, fixed in enumerate(self.fixed)
        ]
        if follows is not None:
            self.new_masks = [follows.to(mask.device) for mask in self.new_masks]
        self.hidden_0_1 = [self._read_0_1_hidden(state_dict, i) for i in range(len(self.fixed))]

    def _incoming_mask(self, state_dict: dict[str, Any], i: int, fixed: FixedMask) -> Tensor:
        key = f"{self.base}{i}.mask"
        incoming = state_dict.get(key)
        if self.plain or not isinstance(incoming, Tensor):
            return fixed.values  # Missing (or not a tensor): torch's own checks report it.
        try:
            mask = _checks.as_bool_mask(incoming, "load_state_dict")
            shape_only = torch.empty(self.shape, device="meta")
            _checks.check_mask_fits(mask, shape_only, self.plain_key, "load_state_dict")
        except (TypeError, ValueError) as err:
            self.problems.append(f"While loading {key!r}: {err}")
            return fixed.values
        return mask

    def _read_0_1_hidden(self, state_dict: dict[str, Any], i: int) -> Tensor | None:
        """The values mask ``i`` hides, as a checkpoint saved them as its extra state.

        Reads files written by maskparam 0.1.x; may be dropped in 1.0.
        """
        key = f"{self.base}{i}.{_compat.EXTRA_STATE_KEY}"
        if key not in state_dict:
            return None
        hidden = state_dict.pop(key)
        if hidden is None:
            return None
        if not isinstance(hidden, Tensor):
            self.problems.append(
                f"While loading {key!r}: the values a mask hides (saved by maskparam 0.1) must "
                f"be a tensor of the original's shape {self.shape}. Got {type(hidden).__name__}."
            )
            return None
        if tuple(hidden.shape) != self.shape:
            self.problems.append(
                f"While loading {key!r}: the values a mask hides (saved by maskparam 0.1) must "
                f"have the original's shape {self.shape}. Got shape {tuple(hidden.shape)}."
            )
            return None
        return hidden

    def keep_module_state(self, state_dict: dict[str, Any], keep_original: bool) -> None:
        """Load nothing for this tensor: its entries become the module's own."""
        for i, fixed in enumerate(self.fixed):
            key = f"{self.base}{i}.mask"
            if self.plain or key in state_dict:
                state_dict[key] = fixed.mask
        if keep_original and self.original_key in state_dict:
            state_dict[self.original_key] = self.chain.original

    def commit(self, state_dict: dict[str, Any]) -> None:
        """Give the module the checked masks, and the original the values they hide."""
        incoming = self.incoming
        if incoming is not None and any(h is not None for h in self.hidden_0_1):
            values = incoming
            for mask, hidden in zip(self.new_masks, self.hidden_0_1, strict=True):
                if hidden is not None:
                    values = torch.where(mask.to(values.device), values, hidden.to(values))
            state_dict[self.original_key] = values
        for i, (fixed, mask) in enumerate(zip(self.fixed, self.new_masks, strict=True)):
            key = f"{self.base}{i}.mask"
            device = fixed.mask.device
            if self.assign:
                landing = incoming if incoming is not None else state_dict.get(key)
                device = landing.device if isinstance(landing, Tensor) else mask.device
            # A new buffer rather than a copy into the old one: the mask may change shape,
            # and a mask tensor shared with other layers must not change theirs.
            fixed.set_mask(mask, device)
            if self.plain or key in state_dict:
                state_dict[key] = fixed.mask
