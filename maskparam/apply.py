"""Attach, inspect, change and remove fixed masks on a module's weights.

Every public function here validates all of its input before it touches the module, so a
call that raises leaves the module exactly as it was.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _forward, _module_class, _optim, _transaction, taps
from maskparam.parametrizations import BiasMask, FixedMask, channel_activity
from maskparam.partial import DATA_BIAS_MODES, DataBiasMode

__all__ = ["BiasMode", "apply_mask", "get_mask", "is_masked", "remove_mask", "set_mask"]

BiasMode = Literal["keep", "zero", "channel", DataBiasMode]
"""What happens to the layer's bias, see :func:`apply_mask`."""

BIAS_MODES: tuple[str, ...] = get_args(BiasMode)


def apply_mask(
    module: nn.Module,
    mask: Tensor | Any,
    *,
    name: str = "weight",
    bias_mode: BiasMode = "keep",
    execution: taps.Execution = "dense",
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
    - ``"valid"``: the bias is added only at output positions whose active taps see some
      valid input; padding is invalid input, whatever the ``padding_mode``. Conv1d/2d/3d.
    - ``"partial"``: partial convolution (Liu et al. 2018) over the active taps: the output
      is rescaled by active taps / active taps on valid input, and is 0 where no active tap
      sees valid input. Conv1d/2d/3d.

    The last two change how the layer runs, not its weights: :mod:`maskparam.partial` has
    the exact definitions and :func:`~maskparam.partial.partial_conv` takes an explicit
    validity (holes). The mode is a plain attribute of the module: ``deepcopy`` and
    ``torch.save(module)`` keep it, ``state_dict`` does not hold it, and
    ``remove_mask(bake=True)`` refuses, because a plain conv cannot compute it.

    Execution (Conv1d/2d/3d only), how the masked conv computes:

    - ``"dense"``: the layer's own convolution over every tap, masked ones included.
    - ``"taps"``: only the active taps, split exactly into a few dense, possibly dilated,
      blocks that run as ordinary convolutions (:mod:`maskparam.taps`). Same outputs and
      gradients as dense up to float rounding; on a 2-core CPU, forward+backward of 3-D
      crosses and balls took about 0.15 to 0.6 of dense's time (``benchmarks/bench.py``).
      Cases it does not cover run dense, with a warning.
    - ``"auto"``: times dense, dense in channels-last layout and the taps once per input
      shape, and keeps the fastest; dense unless another is clearly faster.

    The choice is a plain attribute of the module, kept by ``deepcopy`` and
    ``torch.save(module)``, and redone when the mask changes; ``remove_mask`` drops it.

    Args:
        module: Any module with a parameter ``name``: :class:`torch.nn.Conv1d`/2d/3d,
            :class:`torch.nn.ConvTranspose2d` and friends, :class:`torch.nn.Linear`, and
            others.
        mask: Boolean tensor, or numbers that are all 0 or 1 (nested lists and NumPy arrays
            too). Either the kernel's spatial shape, shared by every channel pair, or any
            shape that broadcasts to the full weight shape, such as ``(out, 1, 1, 1)`` for one
            mask per output channel or the weight's own shape. True keeps a tap.
        name: The parameter to mask.
        bias_mode: ``"keep"``, ``"zero"``, ``"channel"``, ``"valid"`` or ``"partial"``, see
            above.
        execution: ``"dense"``, ``"taps"`` or ``"auto"``, see above.

    Returns:
        The same module, parametrized in place.

    Raises:
        TypeError: If ``module`` is not a module or ``mask`` is not tensor-like.
        ValueError: If the mask does not fit the weight or holds values other than 0/1, if
            the module has no such parameter or it is already masked, if its gradients are
            sparse (``nn.Embedding(sparse=True)``), if ``bias_mode`` is
            unknown or cannot apply to this layer, or if ``execution`` is unknown or set for
            a ``name`` other than ``"weight"``.

    Warns:
        UserWarning: If the mask switches every tap off, or if ``execution="taps"`` cannot
            apply (not a Conv1d/2d/3d, a data-dependent ``bias_mode``, a mask too
            fragmented for boxes where the tap kernel cannot run), so the layer runs dense.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, bias=False)
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        >>> conv = apply_mask(conv, plus)
        >>> (conv.weight[0, 0] != 0).int()
        tensor([[0, 1, 0],
                [1, 1, 1],
                [0, 1, 0]], dtype=torch.int32)
    """
    weight, mask, bias_mask, execution_plan = _prepare(module, mask, name, bias_mode, execution)
    _checks.warn_if_empty(mask, f"{_checks.layer_name(module)}.{name}")
    with _transaction.atomic([module]):
        _module_class.record_parameter_order(module)
        parametrize.register_parametrization(module, name, FixedMask(mask).to(weight.device))
        if bias_mask is not None:
            parametrize.register_parametrization(module, "bias", bias_mask)
        # Options that change how the convolution runs (see maskparam._forward) are recorded
        # on the module here, before adopt() builds its class.
        if bias_mode in DATA_BIAS_MODES:
            module.__dict__[_forward.BIAS_MODE_ATTR] = bias_mode
        if execution_plan is not None:
            module.__dict__[_forward.EXECUTION_ATTR] = execution_plan
            taps.watch(module)
        _module_class.adopt(module)
    return module


def remove_mask(module: nn.Module, *, name: str = "weight", bake: bool = True) -> nn.Module:
    """Remove the mask from ``module.<name>``, and whatever its ``bias_mode`` added.

    Args:
        module: A module masked with :func:`apply_mask`.
        name: The masked parameter.
        bake: If True, the parameter keeps its masked values: zero at masked taps. If False,
            the active taps keep their (trained) values and the masked taps get back, bitwise,
            the values they had when they were masked, even where weight decay or momentum
            has moved the stored copy since. Either way it is the same
            :class:`~torch.nn.Parameter` object as before, so an optimizer built earlier keeps
            working.

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
    _check_removable(module, name, bake)
    owned_bias = name == "weight" and _bias_mask_of(module) is not None
    _optim.release(module, (name, "bias") if owned_bias else (name,))
    with _transaction.atomic([module]):
        for tensor_name in (name, "bias") if owned_bias else (name,):
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=bake)
        if name == "weight":
            taps.unwatch(module)
            for attr in _forward.ATTRS:
                module.__dict__.pop(attr, None)
        if parametrize.is_parametrized(module):
            _module_class.adopt(module)  # rebuilt without what was removed
        else:
            _module_class.restore_parameter_order(module)
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

    Use :func:`set_mask` to change it: editing the copy changes nothing. On a model built
    on the meta device, the mask is returned on the CPU, with its values.

    Raises:
        ValueError: If ``module.<name>`` is not masked.

    Example:
        >>> conv = apply_mask(nn.Conv1d(2, 2, 3), torch.tensor([1, 0, 1]))
        >>> get_mask(conv)
        tensor([ True, False,  True])
    """
    _checks.check_module(module, "get_mask")
    return _the_fixed_mask(module, name, "get_mask").values.clone()


def set_mask(module: nn.Module, mask: Tensor | Any, name: str = "weight") -> nn.Module:
    """Replace the mask on ``module.<name>`` in place, with the same validation as apply.

    Taps that the new mask switches back on return with the values they had when they were
    masked, even if weight decay has moved the stored copy since; taps it switches off keep
    their current values hidden, for a later ``set_mask`` or ``remove_mask(bake=False)``.
    Active taps keep their values. A ``bias_mode="channel"`` bias
    follows the new mask, and so does the coverage of ``bias_mode="valid"``/``"partial"``
    from the next forward on, and the plan of ``execution="taps"``/``"auto"``.

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
    _, weight = _mask_and_original(module, name)
    where = f"{_checks.layer_name(module)}.{name}"
    _checks.check_mask_fits(new, weight, where, "set_mask")
    bias = _bias_mask_of(module) if name == "weight" else None
    bias_new = None
    if bias is not None and bias.mode == "channel":
        bias_new = channel_activity(module, weight.shape, new)
    execution = module.__dict__.get(_forward.EXECUTION_ATTR) if name == "weight" else None
    execution_new = None
    if isinstance(execution, taps.TapExecution):
        execution_new = execution.for_mask(module, new, weight.shape)
    _checks.warn_if_empty(new, where)
    _optim.release(module, (name, "bias") if bias_new is not None else (name,))
    with _transaction.atomic([module]):
        fixed.set_mask(new)
        if bias is not None and bias_new is not None:
            bias.set_mask(bias_new)
        if execution_new is not None:
            module.__dict__[_forward.EXECUTION_ATTR] = execution_new
    return module


# -- helpers ------------------------------------------------------------------------------


def _mask_and_original(module: nn.Module, name: str) -> tuple[FixedMask, Tensor]:
    """The FixedMask on the masked ``module.<name>`` and the original it stores."""
    chain: Any = module.parametrizations[name]  # type: ignore[index]
    fixed, original = chain[0], chain.original
    assert isinstance(fixed, FixedMask)
    assert isinstance(original, Tensor)
    return fixed, original


def _prepare(
    module: nn.Module, mask: Tensor | Any, name: str, bias_mode: str, execution: str = "dense"
) -> tuple[Tensor, Tensor, BiasMask | None, taps.TapExecution | None]:
    """Every check :func:`apply_mask` makes, changing nothing.

    Returns the weight, the bool mask, the bias parametrization and the execution plan.
    :func:`maskparam.model.apply_masks` runs it on every layer before it masks any, so a check
    that ``apply_mask`` needs belongs here.
    """
    _checks.check_module(module, "apply_mask")
    weight = _unmasked_parameter(module, name)
    if getattr(module, "sparse", False) is True:
        raise ValueError(
            f"apply_mask expects a layer whose gradients are dense. Got "
            f"{_checks.layer_name(module)} with sparse=True: its {name} gets a sparse "
            "gradient, which cannot flow through the mask (torch.where), so backward would "
            "fail. Build the layer with sparse=False to mask it."
        )
    mask = _checks.as_bool_mask(mask, "apply_mask")
    where = f"{_checks.layer_name(module)}.{name}"
    _checks.check_mask_fits(mask, weight, where, "apply_mask")
    check_options(bias_mode, execution, "apply_mask")
    bias_mask = _bias_mask_for(module, weight, name, mask, bias_mode)
    return weight, mask, bias_mask, taps.prepare(module, mask, name, execution, bias_mode)


def _check_removable(module: nn.Module, name: str, bake: bool) -> None:
    """Every check :func:`remove_mask` makes, changing nothing.

    :func:`maskparam.model.remove_masks` runs it on every masked tensor before it removes
    any, so a check that ``remove_mask`` needs belongs here.
    """
    check_bake(bake, "remove_mask")
    _the_fixed_mask(module, name, "remove_mask")
    data_bias = module.__dict__.get(_forward.BIAS_MODE_ATTR) if name == "weight" else None
    if bake and data_bias is not None:
        raise ValueError(
            f"remove_mask(bake=True) would leave a plain "
            f"{_checks.layer_name(module)}, which cannot compute "
            f"bias_mode={data_bias!r}: it would add the bias everywhere and not rescale. Keep "
            "the module masked (it saves, copies and compiles as it is), or call "
            "remove_mask(module, bake=False) to drop the mask and the bias mode and get the "
            "stored weights back (copy module.weight first to keep the masked values)."
        )


def check_options(bias_mode: object, execution: object, caller: str) -> None:
    """Raise ``ValueError`` unless ``bias_mode`` and ``execution`` are values they can take."""
    if bias_mode not in BIAS_MODES:
        raise ValueError(
            f"{caller} expects bias_mode to be one of {list(BIAS_MODES)}. Got {bias_mode!r}."
        )
    if execution not in taps.EXECUTIONS:
        raise ValueError(
            f"{caller} expects execution to be one of {list(taps.EXECUTIONS)}. Got {execution!r}."
        )


def check_bake(bake: object, caller: str) -> None:
    """Raise ``TypeError`` unless ``bake`` is a bool: ``bake="no"`` must not bake."""
    if not isinstance(bake, bool):
        raise TypeError(
            f"{caller} expects bake to be True (keep the masked values) or False (give the "
            f"masked taps their stored values back). Got {bake!r} of type {type(bake).__name__}."
        )


def _unmasked_parameter(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` if it is a parameter that apply_mask may parametrize."""
    if not isinstance(name, str):
        raise TypeError(f"apply_mask expects name to be a str. Got {type(name).__name__}.")
    existing = _checks.parametrizations_of(module, name)
    kind = _checks.layer_name(module)
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
            "then the other parametrization, if it can follow one (spectral_norm can; "
            "weight_norm and orthogonal cannot)."
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
    kind = _checks.layer_name(module)
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
    if bias_mode == "keep":
        return None
    kind = _checks.layer_name(module)
    if name != "weight":
        raise ValueError(
            f"bias_mode={bias_mode!r} applies when masking a layer's weight. Got "
            f"name={name!r}; use bias_mode='keep'."
        )
    if bias_mode in DATA_BIAS_MODES:
        if not isinstance(module, _compat.ConvNd) or module.transposed:
            raise ValueError(
                f"bias_mode={bias_mode!r} counts the valid input under each output position, "
                f"which it does for Conv1d, Conv2d and Conv3d. Got {kind}; use "
                "bias_mode='keep', 'zero' or 'channel'."
            )
        return None  # Runs in the forward (maskparam.partial); with or without a bias.
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
        return BiasMask(torch.zeros(bias.shape, dtype=torch.bool), "zero").to(bias.device)
    if bias.numel() == 0:
        raise ValueError(
            "bias_mode='channel' holds the bias of each output channel whose filter is fully "
            f"masked, so it needs at least one output channel. Got {kind} with "
            f"bias.shape={tuple(bias.shape)}; use bias_mode='keep' or 'zero'."
        )
    active = channel_activity(module, weight.shape, mask)
    if active.shape != bias.shape:
        raise ValueError(
            f"bias_mode='channel' expects one bias per output channel. Got "
            f"{kind}.bias.shape={tuple(bias.shape)} for {active.numel()} output channels."
        )
    return BiasMask(active, "channel").to(bias.device)
