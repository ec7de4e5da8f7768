"""The forward a masked conv runs when maskparam changes how the convolution itself runs.

Most masked layers keep their own forward: the parametrization alone masks the weight. Two
per-layer options replace :meth:`torch.nn.Conv2d._conv_forward` (and its 1-D/3-D twins):
data-dependent bias (``bias_mode="valid"``/``"partial"``, :mod:`maskparam.partial`) and
active-tap execution (``execution=``, :mod:`maskparam.taps`). Each records its choice as a
plain attribute on the module, named below, so ``deepcopy`` and pickling carry it, and
:func:`maskparam._module_class.adopt` installs :func:`conv_forward` on the module's class when
one is present. Each option registers its forward here (:func:`register`) when its module is
imported, so this module imports neither: no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from maskparam import _compat

__all__ = [
    "ATTRS",
    "BIAS_MODE_ATTR",
    "EXECUTION_ATTR",
    "ConvForward",
    "conv_forward",
    "dense_forward",
    "needs_override",
    "register",
]

BIAS_MODE_ATTR = "_maskparam_bias_mode"
EXECUTION_ATTR = "_maskparam_execution"
ATTRS = (BIAS_MODE_ATTR, EXECUTION_ATTR)
"""The options' attributes, in order of precedence: data-dependent bias runs its own
convolutions, so it comes first."""

ConvForward = Callable[[Any, Tensor, Tensor, "Tensor | None"], Tensor]
"""``(module, input, weight, bias) -> output``, as ``_conv_forward`` with the module first."""

_FORWARDS: dict[str, ConvForward] = {}


def register(attr: str, forward: ConvForward) -> None:
    """Make a conv whose ``__dict__`` holds ``attr`` run ``forward`` (one of :data:`ATTRS`).

    Raises:
        ValueError: If ``attr`` is not one of :data:`ATTRS`.
    """
    if attr not in ATTRS:
        raise ValueError(f"register expects one of the attributes {list(ATTRS)}. Got {attr!r}.")
    _FORWARDS[attr] = forward


def needs_override(module: nn.Module) -> bool:
    """Whether ``module`` is a (non-transposed) conv with an option that changes its forward."""
    return (
        isinstance(module, _compat.ConvNd)
        and not module.transposed
        and any(attr in module.__dict__ for attr in ATTRS)
    )


def conv_forward(self: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``_conv_forward`` of a masked conv whose options change how it runs."""
    for attr in ATTRS:
        if attr in self.__dict__ and attr in _FORWARDS:
            return _FORWARDS[attr](self, input, weight, bias)
    return dense_forward(self, input, weight, bias)


def dense_forward(module: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own convolution, as if maskparam did not change its forward."""
    # The class maskparam recorded, not __bases__[0]: FSDP2 subclasses the class again.
    base: type[nn.Module] = type(module)._maskparam_base  # type: ignore[attr-defined]
    return _compat.dense_conv_forward(base, module, input, weight, bias)
