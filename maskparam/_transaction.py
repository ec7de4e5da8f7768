"""All or nothing: a call that changes modules completes, or leaves them exactly as they were.

:func:`atomic` wraps every public call that masks, unmasks or changes a mask. It records what
such a call can change on each module (its class, the properties that parametrize adds to and
deletes from that class, its attributes, the dicts that hold its parameters, buffers,
submodules and hooks, and which memory each tensor points at), and puts all of it back if
anything raises inside, a ``KeyboardInterrupt`` included. A Ctrl-C
(SIGINT) that arrives meanwhile is held until the modules are consistent again, then raised.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["atomic", "sigint_held"]

_state = threading.local()


@contextlib.contextmanager
def atomic(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the body so that ``modules`` end up fully changed or not changed at all.

    The body also runs outside inference mode, so that what it creates (masks, plans) can be
    saved for backward in a later training step.
    """
    with sigint_held():
        snapshot = [_ModuleState(module) for module in _with_parametrizations(modules)]
        try:
            with torch.inference_mode(False):
                yield
        except BaseException:
            for state in reversed(snapshot):
                state.restore()
            raise


def _with_parametrizations(modules: Iterable[nn.Module]) -> Iterator[nn.Module]:
    """Each module, then the parametrization modules it holds (not its ordinary children)."""
    seen: set[int] = set()
    for module in modules:
        inner = module._modules.get("parametrizations")
        family = [module, *(inner.modules() if isinstance(inner, nn.Module) else ())]
        for member in family:
            if id(member) not in seen:
                seen.add(id(member))
                yield member


class _ModuleState:
    """What a mask call may change on one module, recorded so that it can be put back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        # parametrize edits the class object itself: it sets a property per parametrized
        # tensor on the class, and deletes it on removal. Classes made for this one module
        # (by parametrize or by maskparam) are therefore part of its state; the module's own
        # class, shared with other instances, is never edited and not recorded.
        self.classes = [(cls, dict(vars(cls))) for cls in _generated_classes(module)]
        self.attrs = dict(module.__dict__)
        # Containers are restored in place: hook handles and torch hold on to them.
        self.contents = {
            key: value.copy()
            for key, value in self.attrs.items()
            if isinstance(value, (dict, set))
        }
        self.memory = [
            (tensor, tensor.detach())
            for tensor in (*module._parameters.values(), *module._buffers.values())
            if isinstance(tensor, Tensor)
        ]

    def restore(self) -> None:
        module = self.module
        for cls, attrs in self.classes:
            _restore_class(cls, attrs)
        module.__class__ = self.cls
        for key in [key for key in module.__dict__ if key not in self.attrs]:
            del module.__dict__[key]
        for key, value in self.attrs.items():
            if key in self.contents:
                value.clear()
                value.update(self.contents[key])
            module.__dict__[key] = value
        with torch.no_grad():
            for tensor, alias in self.memory:
                if not _same_memory(tensor, alias):
                    tensor.set_(alias)  # type: ignore[call-overload]


def _generated_classes(module: nn.Module) -> list[type]:
    """The classes above ``module``'s own that were made for it alone by parametrize."""
    if not parametrize.is_parametrized(module):
        return []
    base = parametrize.type_before_parametrizations(module)
    return [cls for cls in type(module).__mro__ if cls is not base and issubclass(cls, base)]


def _restore_class(cls: type, attrs: dict[str, Any]) -> None:
    """Give ``cls`` back exactly the attributes ``attrs`` (a copy of its ``__dict__``)."""
    for key in [key for key in vars(cls) if key not in attrs]:
        delattr(cls, key)
    for key, value in attrs.items():
        if vars(cls).get(key, _MISSING) is not value:
            setattr(cls, key, value)


_MISSING = object()


def _same_memory(tensor: Tensor, alias: Tensor) -> bool:
    return (
        tensor.untyped_storage().data_ptr() == alias.untyped_storage().data_ptr()
        and tensor.shape == alias.shape
        and tensor.stride() == alias.stride()
        and tensor.storage_offset() == alias.storage_offset()
        and tensor.dtype == alias.dtype
        and tensor.device == alias.device
    )


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block, and deliver it once the block is done.

    Only the main thread receives signals, so elsewhere (and in nested blocks) this does
    nothing.
    """
    if getattr(_state, "holding", False) or threading.current_thread() is not (
        threading.main_thread()
    ):
        yield
        return
    received: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append((signum, frame))

    try:
        previous: Any = signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main interpreter's main thread
        yield
        return
    _state.holding = True
    try:
        yield
    finally:
        _state.holding = False
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
