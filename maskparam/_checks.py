"""Shared validation for the public functions.

Every check here only reads its arguments, so a public function can run them all before it
modifies anything and a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "as_bool_mask",
    "as_drawable_mask",
    "check_mask_fits",
    "check_module",
    "layer_class",
    "layer_name",
    "mask_fits",
    "parametrizations_of",
    "warn_if_empty",
]


def check_module(module: object, caller: str) -> nn.Module:
    """Return ``module`` if it is an :class:`torch.nn.Module`, else raise ``TypeError``."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{caller} expects a torch.nn.Module as its first argument. "
            f"Got {type(module).__name__}."
        )
    return module


def layer_class(module: nn.Module) -> type[nn.Module]:
    """The layer's own class: never the generated ``Parametrized...`` one, nor FSDP's.

    maskparam records the class it derived from as ``_maskparam_base``; FSDP2's
    ``fully_shard`` subclasses the class again, so its first base is ``FSDPModule``.
    """
    base = getattr(type(module), "_maskparam_base", None)
    if isinstance(base, type):
        return base
    return parametrize.type_before_parametrizations(module)


def layer_name(module: object) -> str:
    """The class name to show for ``module`` in a message: :func:`layer_class`'s for a module."""
    if isinstance(module, nn.Module):
        return layer_class(module).__name__
    return type(module).__name__


def parametrizations_of(module: nn.Module, name: str) -> list[nn.Module]:
    """The parametrizations registered on ``module.<name>``, outermost last ([] if none)."""
    if not parametrize.is_parametrized(module, name):
        return []
    return list(module.parametrizations[name])  # type: ignore[index]


def as_bool_mask(mask: Any, caller: str) -> Tensor:
    """Convert ``mask`` to a detached boolean tensor, refusing values other than 0 and 1.

    Accepts a tensor of any real dtype or anything :func:`torch.as_tensor` understands
    (nested lists, NumPy arrays). The result lives on the device of the input.
    """
    if not isinstance(mask, Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{caller} expects the mask as a tensor (bool, or numbers that are all 0 or 1) "
                f"or something torch.as_tensor accepts. Got {type(mask).__name__}: {err}"
            ) from None
    mask = mask.detach()
    assert isinstance(mask, Tensor)
    if mask.is_meta:
        raise ValueError(
            f"{caller} expects a mask with values. Got a tensor on the meta device, which has "
            "none; build the mask on the CPU (a meta model takes a CPU mask and keeps it "
            "through to_empty)."
        )
    if mask.is_nested or mask.layout != torch.strided:
        kind = "nested" if mask.is_nested else f"layout={mask.layout}"
        raise TypeError(
            f"{caller} expects a dense (strided) mask tensor. Got a {kind} tensor; convert it "
            "with .to_dense() first."
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(
            f"{caller} expects a bool mask, or a real-valued one with only 0 and 1. "
            f"Got dtype={mask.dtype}."
        )
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise ValueError(
            f"{caller} expects a mask whose values are all 0 or 1 (or a bool mask). "
            f"Got NaN at {int(torch.isnan(mask).sum())} of {mask.numel()} entries."
        )
    is_binary = (mask == 0) | (mask == 1)
    if not bool(is_binary.all()):
        bad = mask[~is_binary].flatten()[:5].tolist()
        raise ValueError(
            f"{caller} expects a mask whose values are all 0 or 1 (or a bool mask). "
            f"Got other values, for example {bad}."
        )
    return mask != 0


def as_drawable_mask(mask: Any, caller: str, verb: str) -> Tensor:
    """``mask`` as a bool tensor of 1 to 3 non-empty dims, the masks text and pictures show."""
    out = as_bool_mask(mask, caller)
    if not 1 <= out.dim() <= 3:
        raise ValueError(
            f"{caller} {verb} masks of 1 to 3 dims; index a larger one down first "
            f"(for example mask[out, in]). Got shape={tuple(out.shape)}."
        )
    if out.numel() == 0:
        raise ValueError(
            f"{caller} expects every size to be at least 1. Got shape={tuple(out.shape)}."
        )
    return out


def mask_fits(mask: Tensor, weight: Tensor) -> bool:
    """Whether ``mask`` broadcasts to exactly ``weight.shape``."""
    return mask.dim() <= weight.dim() and all(
        m in (1, w) for m, w in zip(reversed(mask.shape), reversed(weight.shape), strict=False)
    )


def check_mask_fits(mask: Tensor, weight: Tensor, where: str, caller: str) -> None:
    """Raise ``ValueError`` unless ``mask`` broadcasts to exactly ``weight.shape``.

    The kernel's spatial shape always qualifies: it is the trailing part of a conv weight.

    Args:
        mask: The boolean mask.
        weight: The tensor it will mask.
        where: How to name the weight in a message, such as ``"Conv2d.weight"``.
        caller: The public function, named in the message.
    """
    if not mask_fits(mask, weight):
        raise ValueError(
            f"{caller} expects a mask of the kernel's spatial shape or one broadcastable to "
            f"the weight. Got mask.shape={tuple(mask.shape)} for "
            f"{where}.shape={tuple(weight.shape)}."
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the line of the user's code that led here, however deep maskparam is.

    The stack level counts the frames inside maskparam and torch (``nn.Module.__call__``
    sits between a user's ``model(x)`` and a forward-time warning), so the warning points
    at the first frame outside both.
    """
    here = inspect.currentframe()  # None where Python keeps no frames: then level 2
    frame = here.f_back if here is not None else None  # warnings.warn's stack level 2
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def warn_if_empty(mask: Tensor, where: str) -> None:
    """Warn when ``mask`` switches off every tap: allowed, but rarely what anyone meant."""
    if mask.numel() == 0 or not bool(mask.any()):
        warn_at_caller(
            f"The mask for {where} is all zero: every tap is switched off, so the weight is "
            "identically zero and learns nothing."
        )
