"""The forward a masked conv runs when maskparam changes how the convolution itself runs.

Most masked layers keep their own forward: the parametrization alone masks the weight. Two
per-layer options replace :meth:`torch.nn.Conv2d._conv_forward` (and its 1-D/3-D twins):
data-dependent bias (``bias_mode="valid"``/``"partial"``, :mod:`maskparam.partial`) and
active-tap execution (``execution=``, :mod:`maskparam.taps`). Each records its choice as a
plain attribute on the module, named below, so ``deepcopy`` and pickling carry it, and
:func:`maskparam._module_class.adopt` installs :func:`conv_forward` on the module's class when
one is present.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maskparam import partial, taps  # they read this module's names only at call time

__all__ = ["ATTRS", "BIAS_MODE_ATTR", "EXECUTION_ATTR", "conv_forward", "needs_override"]

BIAS_MODE_ATTR = "_maskparam_bias_mode"
EXECUTION_ATTR = "_maskparam_execution"
ATTRS = (BIAS_MODE_ATTR, EXECUTION_ATTR)


def needs_override(module: nn.Module) -> bool:
    """Whether ``module`` is a (non-transposed) conv with an option that changes its forward."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and any(attr in module.__dict__ for attr in ATTRS)
    )


def conv_forward(self: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``_conv_forward`` of a masked conv whose options change how it runs."""
    if BIAS_MODE_ATTR in self.__dict__:
        # Data-dependent bias runs its own convolutions; it takes precedence.
        return partial.conv_forward(self, input, weight, bias)
    execution = self.__dict__.get(EXECUTION_ATTR)
    if isinstance(execution, taps.TapExecution):
        return execution.forward(self, input, weight, bias)  # type: ignore[arg-type]
    # The class maskparam recorded, not __bases__[0]: FSDP2 subclasses the class again.
    base: Any = type(self)._maskparam_base  # type: ignore[attr-defined]
    out: Tensor = base._conv_forward(self, input, weight, bias)
    return out
