"""Walking a model: its layers, and the tensors of a layer that carry a mask."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

from maskparam import _checks
from maskparam.parametrizations import FixedMask

__all__ = ["layers", "masked_tensors"]


def layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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
            for child_name, child in module.named_children()
            if not (child_name == "parametrizations" and parametrize.is_parametrized(module))
        ]
        stack.extend(reversed(children))


def masked_tensors(module: nn.Module) -> list[str]:
    """The names of ``module``'s tensors that carry a :class:`~maskparam.FixedMask`."""
    if not parametrize.is_parametrized(module):
        return []
    return [
        tensor_name
        for tensor_name in module.parametrizations  # type: ignore[union-attr]
        if any(isinstance(p, FixedMask) for p in _checks.parametrizations_of(module, tensor_name))
    ]
