"""Attach, inspect, change and remove fixed masks on a module's weights.

Every public function here validates all of its input before it touches the module, so a
call that raises leaves the module exactly as it was.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _forward, _module_class
from maskparam.parametrizations import BiasMask, FixedMask

__all__ = ["BiasMode", "apply_mask", "get_mask", "is_masked", "remove_mask", "set_mask"]

BiasMode = Literal["keep", "zero", "channel"]
"""What happens to the layer's bias, see :func:`apply_mask`."""

BIAS_MODES: tuple[str, ...] = get_args(BiasMode)


def apply_mask(
    module: nn.Module,
    mask: Tensor | Any,
    *,
    name: str = "weight",
    bias_mode: BiasMode = "keep",
) -> nn.Module:
    """Keep ``module.<name>`` at exactly zero wherever ``mask`` is False.

    Registers a :class:`~maskparam.FixedMask` parametrization, so the masked weight is
    recomputed on every access: it is zero at masked taps before any forward, after every
    optimizer step, after ``.to()`` and after ``load_state_dict``. The gradient at masked taps
    is exactly zero. The original values stay stored, so ``remove_mask(bake=False)`` gives
    them back bitwise.

    Bias modes (only for ``name="weight"``):

    - ``"keep"``: the bias is untouched. A conv bias is one number per output channel, added
      after the convolution, so a kernel mask never changes how the bias is added.
    - ``"zero"``: the bias is held at exactly zero and gets zero gradient. The bias parameter
      stays, so checkpoint keys do not change. Nothing to do on a layer without bias.
    - ``"channel"``: the bias of an output channel is held at zero when that channel has no
      active tap, so a fully masked filter outputs exactly zero. Needs a bias, and a layer
      whose output channels are known: Conv, ConvTranspose, Linear or Bilinear.

    Args:
        module: Any module with a parameter ``name``: :class:`torch.nn.Conv1d`/2d/3d,
            :class:`torch.nn.ConvTranspose2d` and friends, :class:`torch.nn.Linear`, and
            others.
        mask: Boolean tensor, or numbers that are all 0 or 1 (nested lists and NumPy arrays
            too). Either the kernel's spatial shape, shared by every channel pair, or any
            shape that broadcasts to the full weight shape, such as ``(out, 1, 1, 1)`` for one
            mask per output channel or the weight's own shape. True keeps a tap.
        name: The parameter to mask.
        bias_mode: ``"keep"``, ``"zero"`` or ``"channel"``, see above.

    Returns:
        The same module, parametrized in place.

    Raises:
        TypeError: If ``module`` is not a module or ``mask`` is not tensor-like.
        ValueError: If the mask does not fit the weight or holds values other than 0/1, if
            the module has no such parameter or it is already masked, or if ``bias_mode`` is
            unknown or cannot apply to this layer.

    Warns:
        UserWarning: If the mask switches every tap off.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, bias=False)
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        >>> conv = apply_mask(conv, plus)
        >>> (conv.weight[0, 0] != 0).int()
        tensor([[0, 1, 0],
                [1, 1, 1],
                [0, 1, 0]], dtype=torch.int32)
    """
    _checks.check_module(module, "apply_mask")
    weight = _unmasked_parameter(module, name)
    mask = _checks.as_bool_mask(mask, "apply_mask")
    where = f"{type(module).__name__}.{name}"
    _checks.check_mask_fits(mask, weight, where, "apply_mask")
    bias_mask = _bias_mask_for(module, weight, name, mask, bias_mode)
    _checks.warn_if_empty(mask, where)

    mask = mask.to(weight.device)
    try:
        parametrize.register_parametrization(module, name, FixedMask(mask))
        if bias_mask is not None:
            parametrize.register_parametrization(module, "bias", bias_mask)
    except BaseException:
        # Unreachable after the checks above, but never leave half a mask behind.
        for tensor_name in (name, "bias"):
            if _checks.parametrizations_of(module, tensor_name):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        raise
    # Options that change how the convolution runs (see maskparam._forward) are recorded on
    # the module here, before adopt() builds its class.
    _module_class.adopt(module)
    return module


def remove_mask(module: nn.Module, *, name: str = "weight", bake: bool = True) -> nn.Module:
    """Remove the mask from ``module.<name>``, and whatever its ``bias_mode`` added.

    Args:
        module: A module masked with :func:`apply_mask`.
        name: The masked parameter.
        bake: If True, the parameter keeps its masked values: zero at masked taps. If False,
            it gets back the values stored under the mask, bitwise, masked taps included.
            Either way it is the same :class:`~torch.nn.Parameter` object as before, so an
            optimizer built earlier keeps working.

    Returns:
        The same module. Once nothing else is parametrized, it is a plain instance of its
        original class again.

    Raises:
        ValueError: If ``module.<name>`` is not masked, or carries other parametrizations
            as well.

    Example:
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3), torch.tensor([1, 0, 1]))
        >>> conv = remove_mask(conv)
        >>> type(conv).__name__, conv.weight[0, 0, 1].item()
        ('Conv1d', 0.0)
    """
    _checks.check_module(module, "remove_mask")
    _the_fixed_mask(module, name, "remove_mask")
    owned_bias = name == "weight" and _bias_mask_of(module) is not None
    for tensor_name in (name, "bias") if owned_bias else (name,):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=bake)
    if name == "weight":
        for attr in _forward.ATTRS:
            module.__dict__.pop(attr, None)
        if parametrize.is_parametrized(module):
            _module_class.adopt(module)  # rebuilt without the forward override
    return module


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a :class:`~maskparam.FixedMask`.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3)
        >>> is_masked(conv), is_masked(apply_mask(conv, torch.ones(3, 3)))
        (False, True)
    """
    _checks.check_module(module, "is_masked")
    return any(isinstance(p, FixedMask) for p in _checks.parametrizations_of(module, name))


def get_mask(module: nn.Module, name: str = "weight") -> Tensor:
    """Return a copy of the boolean mask on ``module.<name>``, in the shape it was given.

    Use :func:`set_mask` to change it: editing the copy changes nothing.

    Raises:
        ValueError: If ``module.<name>`` is not masked.

    Example:
        >>> conv = apply_mask(nn.Conv1d(2, 2, 3), torch.tensor([1, 0, 1]))
        >>> get_mask(conv)
        tensor([ True, False,  True])
    """
    _checks.check_module(module, "get_mask")
    return _the_fixed_mask(module, name, "get_mask").mask.clone()


def set_mask(module: nn.Module, mask: Tensor | Any, name: str = "weight") -> nn.Module:
    """Replace the mask on ``module.<name>`` in place, with the same validation as apply.

    The stored original values are untouched, so taps that the new mask switches back on
    return with the values they had before they were masked. A ``bias_mode="channel"`` bias
    follows the new mask.

    Returns:
        The same module.

    Raises:
        ValueError: If ``module.<name>`` is not masked, or the mask does not fit or holds
            values other than 0/1.

    Example:
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), torch.tensor([1, 0, 1]))
        >>> conv.weight = torch.ones(1, 1, 3)
        >>> conv = set_mask(conv, torch.tensor([0, 1, 0]))
        >>> conv.weight.detach()
        tensor([[[0., 1., 0.]]])
    """
    _checks.check_module(module, "set_mask")
    fixed = _the_fixed_mask(module, name, "set_mask")
    new = _checks.as_bool_mask(mask, "set_mask")
    weight = module.parametrizations[name].original  # type: ignore[index, union-attr]
    where = f"{parametrize.type_before_parametrizations(module).__name__}.{name}"
    _checks.check_mask_fits(new, weight, where, "set_mask")
    bias = _bias_mask_of(module) if name == "weight" else None
    bias_new = None
    if bias is not None and bias.mode == "channel":
        bias_new = _channel_activity(module, weight, new)
    _checks.warn_if_empty(new, where)

    fixed.mask = new.to(fixed.mask.device)
    if bias is not None and bias_new is not None:
        bias.mask = bias_new.to(bias.mask.device)
    return module


# -- helpers ------------------------------------------------------------------------------


def _unmasked_parameter(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` if it is a parameter that apply_mask may parametrize."""
    if not isinstance(name, str):
        raise TypeError(f"apply_mask expects name to be a str. Got {type(name).__name__}.")
    existing = _checks.parametrizations_of(module, name)
    kind = type(module).__name__
    if any(isinstance(p, FixedMask) for p in existing):
        raise ValueError(
            f"{kind}.{name} is already masked. To change its mask use "
            f"set_mask(module, mask, name={name!r}); to start over, call "
            f"remove_mask(module, name={name!r}, bake=False) first."
        )
    if existing:
        raise ValueError(
            f"apply_mask expects {kind}.{name} to be a plain parameter, but it already has "
            f"parametrizations {[type(p).__name__ for p in existing]}. Apply the mask first, "
            "then the other parametrizations."
        )
    param = module._parameters.get(name)
    if param is None:
        if name in module._buffers:
            raise ValueError(
                f"apply_mask expects {kind}.{name} to be a parameter. It is a buffer, which "
                "never trains, so there is nothing to keep masked."
            )
        params = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(
            f"apply_mask expects a module with a parameter named {name!r}. "
            f"{kind} has parameters {params}."
        )
    return param


def _the_fixed_mask(module: nn.Module, name: str, caller: str) -> FixedMask:
    """The FixedMask on ``module.<name>``, which must be its only parametrization."""
    existing = _checks.parametrizations_of(module, name)
    masks = [p for p in existing if isinstance(p, FixedMask)]
    kind = parametrize.type_before_parametrizations(module).__name__
    if not masks:
        raise ValueError(
            f"{caller} expects a masked parameter, but {kind}.{name} is not masked. "
            f"Mask it first with apply_mask(module, mask, name={name!r})."
        )
    if len(existing) > 1:
        raise ValueError(
            f"{caller} expects the mask to be the only parametrization on {kind}.{name}. "
            f"Got {[type(p).__name__ for p in existing]}; remove the others first."
        )
    fixed = masks[0]
    if isinstance(fixed, BiasMask) and caller != "get_mask":
        raise ValueError(
            f"{caller} cannot change {kind}.{name} on its own: it is held by "
            f"bias_mode={fixed.mode!r} of the weight's mask. remove_mask(module) removes both."
        )
    return fixed


def _bias_mask_of(module: nn.Module) -> BiasMask | None:
    existing = _checks.parametrizations_of(module, "bias")
    if len(existing) == 1 and isinstance(existing[0], BiasMask):
        return existing[0]
    return None


def _bias_mask_for(
    module: nn.Module, weight: Tensor, name: str, mask: Tensor, bias_mode: str
) -> BiasMask | None:
    """The bias parametrization ``bias_mode`` asks for, or None; raise if it cannot apply."""
    if bias_mode not in BIAS_MODES:
        raise ValueError(
            f"apply_mask expects bias_mode to be one of {list(BIAS_MODES)}. Got {bias_mode!r}."
        )
    if bias_mode == "keep":
        return None
    kind = type(module).__name__
    if name != "weight":
        raise ValueError(
            f"bias_mode={bias_mode!r} applies when masking a layer's weight. Got "
            f"name={name!r}; use bias_mode='keep'."
        )
    bias = getattr(module, "bias", None)
    if bias is None:
        if bias_mode == "zero":
            return None  # No bias: it is already zero.
        raise ValueError(
            f"bias_mode='channel' needs a layer with a bias, but {kind} has bias=None. "
            "Use bias_mode='keep'."
        )
    if _checks.parametrizations_of(module, "bias"):
        raise ValueError(
            f"bias_mode={bias_mode!r} needs {kind}.bias to be a plain parameter, but it is "
            "already parametrized. Use bias_mode='keep'."
        )
    if bias_mode == "zero":
        return BiasMask(torch.zeros(bias.shape, dtype=torch.bool, device=bias.device), "zero")
    active = _channel_activity(module, weight, mask)
    if active.shape != bias.shape:
        raise ValueError(
            f"bias_mode='channel' expects one bias per output channel. Got "
            f"{kind}.bias.shape={tuple(bias.shape)} for {active.numel()} output channels."
        )
    return BiasMask(active.to(bias.device), "channel")


def _channel_activity(module: nn.Module, weight: Tensor, mask: Tensor) -> Tensor:
    """One bool per output channel: does its filter keep at least one tap under ``mask``?"""
    base = parametrize.type_before_parametrizations(module)
    full = mask.to(weight.device).expand(weight.shape)
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        # ConvTranspose weight is (in, out // groups, *k); output channel g * (out // groups) + j
        # reads the in-channels of group g.
        groups = module.groups
        per_group = full.reshape(groups, full.shape[0] // groups, full.shape[1], -1)
        return per_group.any(dim=3).any(dim=1).reshape(-1)
    if issubclass(base, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)):
        return full.reshape(full.shape[0], -1).any(dim=1)
    raise ValueError(
        "bias_mode='channel' needs to know which weight entries feed each output channel, "
        "which it knows for Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and Bilinear. "
        f"Got {base.__name__}; use bias_mode='keep' or 'zero'."
    )
