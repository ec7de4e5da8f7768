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
paths call it again for the new instance.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from maskparam import _forward

__all__ = ["adopt"]


def adopt(module: nn.Module, base: type[nn.Module] | None = None) -> None:
    """Give a parametrized ``module`` a class of its own, derived from ``base``.

    Args:
        module: A module with at least one parametrization.
        base: Its class before parametrization; found from the module when omitted.
    """
    if base is None:
        base = parametrize.type_before_parametrizations(module)
    namespace: dict[str, Any] = {"__deepcopy__": _deepcopy, "__reduce_ex__": _reduce_ex}
    if _forward.needs_override(module):
        namespace["_conv_forward"] = _forward.conv_forward
    module.__class__ = type(f"Parametrized{base.__name__}", (base,), namespace)
    for tensor_name in module.parametrizations:  # type: ignore[union-attr]
        # The same property torch installs, bound to this instance (its cache key is the id).
        parametrize._inject_property(module, tensor_name)


def _base_of(module: nn.Module) -> type[nn.Module]:
    base: type[nn.Module] = type(module).__bases__[0]
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
