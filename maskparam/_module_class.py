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

from maskparam import _checks, _compat, _forward
from maskparam.parametrizations import FixedMask

__all__ = ["adopt"]


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
    if _forward.needs_override(module):
        namespace["_conv_forward"] = _forward.conv_forward
    module.__class__ = type(f"Parametrized{base.__name__}", (base,), namespace)
    for tensor_name in module.parametrizations:  # type: ignore[union-attr]
        # The same property torch installs, bound to this instance (its cache key is the id).
        _compat.inject_property(module, tensor_name)


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
    adopt(module, base)
    return module


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
    chains: nn.ModuleDict = self.parametrizations  # type: ignore[assignment]
    for tensor_name, chain in chains.items():
        masks = [p for p in chain if isinstance(p, FixedMask)]  # type: ignore[attr-defined]
        if len(masks) == len(chain):  # type: ignore[arg-type]
            _adapt_masked_keys(chain, masks, state_dict, prefix, tensor_name, error_msgs)
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
    chain: nn.Module,
    masks: list[FixedMask],
    state_dict: dict[str, Any],
    prefix: str,
    tensor_name: str,
    errors: list[str],
) -> None:
    """Fit the checkpoint's entries for one masked tensor to the module's parametrization.

    A plain checkpoint holds ``<prefix><name>``: it becomes the stored original, the module
    keeps its masks, and the checkpoint's values at masked entries become what the masks
    hide (so ``remove_mask(bake=False)`` gives the pretrained values back). A masked
    checkpoint holds the original and its masks: each mask is checked to be 0/1 and to fit
    the weight, then replaces the module's mask, whatever shape it has (the kernel's, per
    channel, per element).
    """
    plain_key = f"{prefix}{tensor_name}"
    base = f"{prefix}parametrizations.{tensor_name}."
    original_key = f"{base}original"
    original: Tensor = chain.original  # type: ignore[assignment]
    if plain_key in state_dict and original_key not in state_dict:
        state_dict[original_key] = state_dict.pop(plain_key)
        for i, fixed in enumerate(masks):
            state_dict.setdefault(f"{base}{i}.mask", fixed.mask)
            _fill_hidden(state_dict, original_key, f"{base}{i}._extra_state", fixed.mask, original)
        return
    for i, fixed in enumerate(masks):
        key = f"{base}{i}.mask"
        incoming = state_dict.get(key)
        if not isinstance(incoming, Tensor):
            continue  # Missing (or not a tensor): torch's own checks report it.
        try:
            mask = _checks.as_bool_mask(incoming, "load_state_dict")
            _checks.check_mask_fits(mask, original, plain_key, "load_state_dict")
        except (TypeError, ValueError) as err:
            errors.append(f"While loading {key!r}: {err}")
            state_dict[key] = fixed.mask  # Keep the module's mask; the load raises anyway.
            continue
        # A new buffer rather than a copy into the old one: the mask may change shape, and a
        # mask tensor shared with other layers must not change theirs.
        fixed.mask = mask.to(device=fixed.mask.device, copy=True)
        state_dict[key] = fixed.mask
    for i, fixed in enumerate(masks):  # after the masks: hide what the loaded masks hide
        _fill_hidden(state_dict, original_key, f"{base}{i}._extra_state", fixed.mask, original)


def _fill_hidden(
    state_dict: dict[str, Any], original_key: str, key: str, mask: Tensor, original: Tensor
) -> None:
    """Without saved hidden values, take them from the checkpoint's original at masked taps.

    A plain checkpoint has none to save; the pretrained values it holds there are exactly
    what ``remove_mask(bake=False)`` should give back.
    """
    incoming = state_dict.get(original_key)
    if key in state_dict or not isinstance(incoming, Tensor) or incoming.shape != original.shape:
        return  # Present already, or torch's own checks report the problem.
    state_dict[key] = torch.where(mask.to(incoming.device), 0, incoming)
