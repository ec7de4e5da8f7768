"""Optimizer steps leave the values under a mask exactly as they were.

A masked layer stores one tensor, the original, whose entries under the mask are never
used by the layer but are what ``remove_mask(bake=False)`` gives back. Their gradient is
exactly zero, yet an optimizer step can still move them: weight decay scales every entry,
and momentum or Adam state from before the mask keeps pushing. Rather than keep a second,
weight-sized copy for the life of the layer, this module holds the masked entries aside for
the length of each step and puts them back bitwise afterwards, through torch.optim's global
step hooks (:func:`torch.optim.optimizer.register_optimizer_step_pre_hook`).

That covers every optimizer derived from :class:`torch.optim.Optimizer` (all of
``torch.optim``, and optimizers built before the mask was applied). It cannot cover updates
that bypass ``Optimizer.step``, such as a hand-written ``p.data.mul_(0.9)``.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from maskparam.parametrizations import FixedMask

__all__ = ["held_count", "track"]

_tracked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# Per optimizer, during its step: (the stored tensor, where it is masked, the masked values).
_held: weakref.WeakKeyDictionary[Any, list[_Held]] = weakref.WeakKeyDictionary()
_handles: list[Any] = []


def track(module: nn.Module) -> None:
    """Protect the masked originals of ``module`` in every later optimizer step."""
    if not _handles:
        # No lock: an interrupt could leave one held. Two threads racing here register the
        # hooks twice, which is harmless: a second hold puts back, then holds the same values.
        _handles.append(register_optimizer_step_pre_hook(_hold))
        _handles.append(register_optimizer_step_post_hook(_put_back))
    _tracked.add(module)


def held_count() -> int:
    """How many optimizers hold masked values right now (0 between steps)."""
    return sum(len(held) > 0 for held in _held.values())


def _masked_originals() -> dict[int, tuple[Tensor, Tensor]]:
    """``id(original) -> (original, keep)`` for every masked original of a tracked module."""
    found: dict[int, tuple[Tensor, Tensor]] = {}
    for module in list(_tracked):
        chains = module._modules.get("parametrizations")
        if not isinstance(chains, nn.ModuleDict):
            continue
        for chain in chains.values():
            original = chain._parameters.get("original")
            leading = []
            for parametrization in chain:  # type: ignore[attr-defined]
                if not isinstance(parametrization, FixedMask):
                    break
                leading.append(parametrization.mask)
            if original is None or not leading:
                continue
            keep = leading[0]
            for mask in leading[1:]:
                keep = keep & mask
            found[id(original)] = (original, keep)
    return found


def _hold(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _put_back(optimizer, args, kwargs)  # a step that raised left its values held
    if not _tracked:
        return
    masked = _masked_originals()
    if not masked:
        return
    held = []
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = masked.get(id(param))
                if entry is not None:
                    held.append(_Held(*_local(param, ~entry[1])))
    if held:
        _held[optimizer] = held


def _put_back(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    held = _held.pop(optimizer, None)
    if not held:
        return
    with torch.no_grad():
        for entry in held:
            entry.put_back()


class _Held:
    """The entries of ``stored`` where ``off`` is True, copied aside until put back.

    A mask that varies only over the trailing dims (a kernel's spatial mask) or only over
    the leading ones (one per output channel) picks whole columns or rows of a 2-D view,
    which gathers and scatters several times faster than an elementwise boolean select.
    """

    def __init__(self, stored: Tensor, off: Tensor) -> None:
        self.stored, self.dim = stored, None
        off = off.reshape((1,) * (stored.dim() - off.dim()) + tuple(off.shape))
        varies = [size != 1 for size in off.shape]
        if stored.is_contiguous() and any(varies):
            first = varies.index(True)
            last = len(varies) - varies[::-1].index(True)  # off varies within [first, last)
            if first > 0 and last == stored.dim():  # columns of a (lead, trail) view
                split, self.dim = first, 1
                picked = off.reshape(off.shape[first:]).expand(stored.shape[first:])
            elif first == 0 and last < stored.dim():  # rows
                split, self.dim = last, 0
                picked = off.reshape(off.shape[:last]).expand(stored.shape[:last])
        if self.dim is not None:
            self.view = stored.view(
                math.prod(stored.shape[:split]), math.prod(stored.shape[split:])
            )
            self.index = picked.reshape(-1).nonzero().squeeze(1)
            self.values = self.view.index_select(self.dim, self.index)
        else:  # a mask per element: an index would take twice the values' memory
            self.off = off.expand(stored.shape)
            self.values = stored.masked_select(self.off)

    def put_back(self) -> None:
        if self.dim is None:
            self.stored.masked_scatter_(self.off, self.values)
        else:
            self.view.index_copy_(self.dim, self.index, self.values)


def _local(param: Tensor, off: Tensor) -> tuple[Tensor, Tensor]:
    """The tensor an optimizer writes for ``param``, and ``off`` cut to match it.

    A DTensor (FSDP2's sharded parameter) is written shard by shard; each rank holds only
    its own part of the mask's entries.
    """
    off = off.to(param.device)
    if not _is_dtensor(param):
        return param, off
    from maskparam import _compat

    local: Tensor = param.to_local()  # type: ignore[attr-defined]
    return local, _compat.local_shard(off, param)


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
