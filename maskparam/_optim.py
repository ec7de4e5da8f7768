"""Optimizer steps leave the values under a mask exactly as they were.

A masked layer stores one tensor, the original, whose entries under the mask are never
used by the layer but are what ``remove_mask(bake=False)`` gives back. Their gradient is
exactly zero, yet an optimizer step can still move them: weight decay scales every entry,
and momentum or Adam state from before the mask keeps pushing. Rather than keep a second,
weight-sized copy for the life of the layer, this module holds the masked entries aside for
the length of each step and puts them back bitwise afterwards, through torch.optim's global
step hooks (:func:`torch.optim.optimizer.register_optimizer_step_pre_hook`).

That covers every optimizer derived from :class:`torch.optim.Optimizer` (all of
``torch.optim``, and optimizers built before the mask was applied), for masks applied through
maskparam (:func:`track`). It cannot cover updates that bypass ``Optimizer.step``, such as a
hand-written ``p.data.mul_(0.9)``.

The rules that keep a weight from ever being silently wrong:

- Held values go back only at the end of the step that held them, into the tensor the
  parameter holds then (an optimizer may rebind ``p.data``). A step that raised or was
  interrupted never reaches its end: its hold is dropped at the optimizer's next step, never
  written, and if the failed step moved values under a mask a warning names the layers.
- The put-back cannot be split by Ctrl-C.
- A registry maps each masked parameter to the masked modules that store it, so a step costs
  time in proportion to the optimizer's parameters, not to every masked module alive. A
  parameter stored by several masked modules (tied weights) is held only where every one of
  them masks it: the others train it.
- The hooks run eagerly (:func:`torch.compiler.disable`), so a compiled ``opt.step`` breaks
  its graph around them instead of tracing maskparam's bookkeeping.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from maskparam import _compat, _transaction
from maskparam._checks import layer_name
from maskparam.parametrizations import FixedMask

__all__ = ["held_count", "mark_stale", "release", "track"]

# Several threads may mask modules, copy them and step optimizers at once, and garbage
# collection may drop entries at any moment. The state is plain dicts, read and written one
# item at a time and iterated only through list() copies, each a single step under the GIL:
# no lock, so no lock that a fault between two lines could leave held.
# id(parameter) -> the masked modules that store that parameter as an original.
_registry: dict[int, _Owners] = {}
# Every module given to track(), for the one full pass that a new optimizer or a load needs.
_tracked: dict[int, weakref.ref[nn.Module]] = {}
# id(optimizer) -> its step in progress. Keyed by id: an optimizer need not be hashable.
_steps: dict[int, _Step] = {}
# Optimizers whose parameters the registry has been checked against since it last changed.
_checked: dict[int, weakref.ref[Any]] = {}
_handles: list[Any] = []


def track(module: nn.Module) -> None:
    """Protect the masked originals of ``module`` in every later optimizer step."""
    if not _handles:
        # Two threads racing here register the hooks twice, which is harmless: the second
        # hold finds the first one's values unmoved, and holds them again.
        _handles.append(register_optimizer_step_pre_hook(_hold))
        _handles.append(register_optimizer_step_post_hook(_put_back))
    key = id(module)
    if key not in _tracked or _tracked[key]() is not module:

        def on_free(ref: weakref.ref[nn.Module]) -> None:
            if _tracked.get(key) is ref:
                _tracked.pop(key, None)

        _tracked[key] = weakref.ref(module, on_free)
    _register(module)


def mark_stale() -> None:
    """Make the next step of every optimizer check the registry against its parameters.

    For a load with ``assign=True``, which gives a masked module new parameter objects. Other
    such changes (``to_empty``, FSDP2's sharding) come before an optimizer is built, and a
    new optimizer's first step checks the registry anyway.
    """
    _checked.clear()


def release(module: nn.Module, names: Iterable[str] | None = None) -> None:
    """Drop every hold on the originals of ``module``'s masked ``names`` (all by default).

    Called before maskparam itself writes them (a load, a bake, a new mask). A step still
    holding their values either failed or is running a closure that made the call; either
    way, the values written now are newer than the held ones, which must never be written
    over them.
    """
    chains: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
    wanted = set(chains.keys()) if names is None else set(names)
    ids = {
        id(chain._parameters.get("original")) for name, chain in chains.items() if name in wanted
    }
    for key, step in list(_steps.items()):
        step.drop(ids)
        if all(held.dropped for held in step.held):
            _steps.pop(key, None)


def held_count() -> int:
    """How many optimizer steps hold masked values right now.

    0 between steps; a step that raised keeps its hold until that optimizer's next step,
    which drops it.
    """
    return len(_steps)


# -- the registry -------------------------------------------------------------------------


class _Owners:
    """The masked modules that store one parameter, and where all of them mask it."""

    def __init__(self, param: Tensor) -> None:
        key = id(param)

        def on_free(ref: weakref.ref[Tensor]) -> None:
            if _registry.get(key) is self:
                _registry.pop(key, None)

        self.param = weakref.ref(param, on_free)
        self.users: dict[tuple[int, str], weakref.ref[nn.Module]] = {}
        self.cached: tuple[tuple[Tensor, ...], tuple[Any, ...], _Where] | None = None

    def where(self, param: Tensor) -> _Where | None:
        """Which entries of ``param`` to hold: those that no user keeps. None if no user.

        Cached while the users and their masks stay the same objects at the same version.
        """
        found = []
        for key, ref in list(self.users.items()):
            module = ref()
            masks = None if module is None else _leading_masks(module, key[1], param)
            if not masks:
                self.users.pop(key, None)  # gone, unmasked, or storing another tensor now
                continue
            found.append((module, key[1], masks))
        if not found:
            return None
        # The cache keeps the masks themselves: compared by identity, a freed mask's id
        # could come back as a new mask's.
        every_mask = tuple(mask for _, _, masks in found for mask in masks)
        signature = (
            tuple((id(module), name) for module, name, _ in found),
            tuple(_compat.tensor_version(mask) for mask in every_mask),
            _local(param).shape,
            param.device,
        )
        cached = self.cached
        if (
            cached is not None
            and cached[1] == signature
            and len(cached[0]) == len(every_mask)
            and all(a is b for a, b in zip(cached[0], every_mask, strict=True))
        ):
            return cached[2]
        keep = None
        for _, _, masks in found:
            user_keeps = masks[0]
            for mask in masks[1:]:
                user_keeps = user_keeps & mask
            keep = user_keeps if keep is None else keep | user_keeps
        names = [f"{layer_name(module)}.{name}" for module, name, _ in found]
        where = _Where(param, ~keep, names)  # type: ignore[operator]
        self.cached = (every_mask, signature, where)
        return where


def _leading_masks(module: nn.Module, name: str, param: Tensor) -> list[Tensor]:
    """The masks of the FixedMasks that lead ``module``'s chain for ``name``.

    Empty unless that chain stores ``param``. The module keeps an entry where all are True.
    """
    chains = module._modules.get("parametrizations")
    chain = chains._modules.get(name) if isinstance(chains, nn.ModuleDict) else None
    if chain is None or chain._parameters.get("original") is not param:
        return []
    masks = []
    for parametrization in chain:  # type: ignore[attr-defined]
        if not isinstance(parametrization, FixedMask):
            break
        masks.append(parametrization.mask)
    return masks


def _register(module: nn.Module) -> None:
    chains = module._modules.get("parametrizations")
    if not isinstance(chains, nn.ModuleDict):
        return
    for name, chain in chains.items():
        original = chain._parameters.get("original")
        if not isinstance(original, Tensor) or not _leading_masks(module, name, original):
            continue
        owners = _registry.get(id(original))
        if owners is None or owners.param() is not original:
            owners = _registry[id(original)] = _Owners(original)
        owners.users[(id(module), name)] = weakref.ref(module)


def _refresh(optimizer: Any) -> None:
    """Register every tracked module again, once per optimizer after a change we cannot see."""
    key = id(optimizer)
    ref = _checked.get(key)
    if ref is not None and ref() is optimizer:
        return
    for module_ref in list(_tracked.values()):
        module = module_ref()
        if module is not None:
            _register(module)

    def on_free(ref: weakref.ref[Any]) -> None:
        _checked.pop(key, None)

    _checked[key] = weakref.ref(optimizer, on_free)


# -- the hold -------------------------------------------------------------------------------


def _hold(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        _eager_hold(optimizer, args, kwargs)  # a graph break: the hold runs outside the trace
    else:
        _hold_now(optimizer)


def _put_back(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        _eager_put_back(optimizer, args, kwargs)
    elif id(optimizer) in _steps:
        _put_back_now(optimizer)


def _hold_now(optimizer: torch.optim.Optimizer) -> None:
    stale = _steps.pop(id(optimizer), None)
    if stale is not None:
        stale.drop()
    if not _tracked:
        return
    _refresh(optimizer)
    held = []
    for param in _parameters(optimizer):
        owners = _registry.get(id(param))
        if owners is None or owners.param() is not param:
            continue
        where = owners.where(param)
        if where is not None:
            held.append(_Held(param, where))
    if held:
        _steps[id(optimizer)] = _Step(optimizer, held)


def _put_back_now(optimizer: torch.optim.Optimizer) -> None:
    # Ctrl-C is held until every value is back: a put-back split in two would lose some.
    with _transaction.sigint_held():
        # A step outlives no optimizer (its weakref callback forgets it), so the step found
        # under this id is this optimizer's.
        step = _steps.pop(id(optimizer), None)
        if step is not None:
            step.put_back()


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _eager_hold(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _hold_now(optimizer)


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _eager_put_back(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if id(optimizer) in _steps:
        _put_back_now(optimizer)


def _parameters(optimizer: Any) -> Iterator[Tensor]:
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in seen:
                seen.add(id(param))
                yield param


class _Step:
    """The values one optimizer step holds, until its end puts them back."""

    def __init__(self, optimizer: Any, held: list[_Held]) -> None:
        key = id(optimizer)

        def on_free(ref: weakref.ref[Any]) -> None:
            _steps.pop(key, None)

        # Kept only for its callback: a step never outlives its optimizer, so the id that
        # finds it in _steps cannot belong to another optimizer.
        self.on_free = weakref.ref(optimizer, on_free)
        self.name = type(optimizer).__name__
        self.held = held

    def put_back(self) -> None:
        for held in self.held:
            if not held.dropped:
                held.put_back()

    def drop(self, params: set[int] | None = None) -> None:
        """Forget the values held for ``params`` (all by default) without writing them.

        If the step had moved them, say so once: they stay where the step left them.
        """
        dropped = [
            held
            for held in self.held
            if not held.dropped and (params is None or id(held.param) in params)
        ]
        moved = Counter(name for held in dropped if held.moved() for name in held.names)
        for held in dropped:
            held.dropped = True
        if moved:
            warnings.warn(
                f"A {self.name} step did not finish (it raised or was interrupted), or is "
                f"still running, and it has moved values under the mask of {_count(moved)}. "
                "maskparam does not put them back, since newer values may be written over "
                "them: the masked weights are unaffected, but remove_mask(bake=False) and "
                "set_mask give back the moved values.",
                RuntimeWarning,
                stacklevel=4,
            )


class _Where:
    """Which entries of a parameter to hold, and how to gather and scatter them.

    A mask that varies only over the trailing dims (a kernel's spatial mask) or only over
    the leading ones (one per output channel) picks whole columns or rows of a 2-D view,
    which gathers and scatters several times faster than an elementwise boolean select.
    """

    def __init__(self, param: Tensor, off: Tensor, names: list[str]) -> None:
        self.names = names
        stored = _local(param)
        off = off.to(stored.device)
        if _compat.is_dtensor(param):
            off = _compat.local_shard(off, param)
        self.off = off.reshape((1,) * (stored.dim() - off.dim()) + tuple(off.shape))
        self.shape = stored.shape
        self.dim: int | None = None
        varies = [size != 1 for size in self.off.shape]
        if any(varies):
            first = varies.index(True)
            last = len(varies) - varies[::-1].index(True)  # off varies within [first, last)
            if first > 0 and last == stored.dim():  # columns of a (lead, trail) view
                self.split, self.dim = first, 1
                picked = self.off.reshape(self.off.shape[first:]).expand(stored.shape[first:])
            elif first == 0 and last < stored.dim():  # rows
                self.split, self.dim = last, 0
                picked = self.off.reshape(self.off.shape[:last]).expand(stored.shape[:last])
        if self.dim is not None:
            self.index = picked.reshape(-1).nonzero().squeeze(1)

    def _view(self, stored: Tensor) -> Tensor | None:
        if self.dim is None or not stored.is_contiguous():
            return None
        split = self.split
        return stored.view(math.prod(stored.shape[:split]), math.prod(stored.shape[split:]))

    def gather(self, stored: Tensor) -> Tensor:
        """The held entries of ``stored``, in row-major order (either way they are taken)."""
        view = self._view(stored)
        if view is not None:
            return view.index_select(self.dim, self.index)  # type: ignore[arg-type]
        # A mask per element, or a tensor that is not contiguous: an index would take
        # twice the values' memory.
        return stored.masked_select(self.off.expand(stored.shape))

    def scatter(self, stored: Tensor, values: Tensor) -> None:
        """Write ``values`` (from :meth:`gather`) back into the held entries of ``stored``."""
        view = self._view(stored)
        if view is not None and values.dim() == 2:
            view.index_copy_(self.dim, self.index, values)  # type: ignore[arg-type]
        else:
            stored.masked_scatter_(self.off.expand(stored.shape), values.reshape(-1))


class _Held:
    """The entries of ``param`` that ``where`` picks, copied aside until put back.

    They go back into the tensor the parameter holds at put-back, which an optimizer that
    rebinds ``p.data`` may have replaced.
    """

    def __init__(self, param: Tensor, where: _Where) -> None:
        self.param, self.where, self.names = param, where, where.names
        self.dropped = False
        stored = _local(param)
        self.shape, self.dtype = stored.shape, stored.dtype
        self.values = where.gather(stored)

    def _current(self) -> Tensor | None:
        """The tensor ``param`` holds now, if the values still fit it."""
        stored = _local(self.param)
        if stored.shape != self.shape or stored.dtype != self.dtype:
            return None  # resized or converted meanwhile: the held values no longer apply
        return stored

    def put_back(self) -> None:
        stored = self._current()
        if stored is not None:
            self.where.scatter(stored, self.values)

    def moved(self) -> bool:
        """Whether the values under the mask differ, bit for bit, from the held ones."""
        stored = self._current()
        if stored is None:
            return True
        now = self.where.gather(stored).reshape(-1)
        held = self.values.reshape(-1)
        if now.shape != held.shape:
            return True
        return not torch.equal(_bits(now), _bits(held))


def _count(names: Counter[str]) -> str:
    return ", ".join(
        name if count == 1 else f"{name} ({count} layers)" for name, count in sorted(names.items())
    )


def _bits(values: Tensor) -> Tensor:
    """The values' bytes, so that NaN equals NaN and -0.0 differs from 0.0."""
    return values.contiguous().view(torch.uint8)


def _local(param: Tensor) -> Tensor:
    """The memory an optimizer writes for ``param`` (a DTensor's local shard, for FSDP2).

    Detached, so that gathering and scattering record nothing for autograd: no grad-mode
    switch that a fault between two lines could leave off.
    """
    if _compat.is_dtensor(param):
        local: Tensor = param.to_local()  # type: ignore[attr-defined]
        return local.detach()
    return param.detach()
