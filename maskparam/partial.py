"""Partial convolution for masked convs: a bias and a scale that follow valid input.

``apply_mask(conv, mask, bias_mode="valid")`` or ``bias_mode="partial"`` makes a masked conv
aware of which input is valid, counted with the kernel's *active* taps only. This module
computes that coverage and runs the convolution; :func:`partial_conv` and
:class:`PartialSequential` pass an explicit validity through a network.

Definitions, for a conv masked with ``K`` and an input validity ``v`` (True is valid input;
padding is always invalid, whatever the ``padding_mode``):

- ``cov = conv(v, K)``: per output position and output channel, the number of active taps
  that land on valid input, with the conv's stride, dilation and groups. With multi-channel
  validity ``(N, C_in, *spatial)`` a tap is one weight entry (input channel, kernel
  position). With single-channel validity ``(N, 1, *spatial)``, which stands for the same
  validity on every input channel, a tap is a kernel position; a mask that differs between
  the input channels of a filter counts each position by the fraction of them it keeps.
- ``|K|`` is the coverage of an all-valid window: per output channel, its active kernel
  positions (single-channel validity) or active weight entries (multi-channel). The scale
  ``|K| / cov`` is the same either way for the same validity.
- ``"valid"``: ``out = conv(x * v, W * K) + b * [cov > 0]``.
- ``"partial"``: ``out = conv(x * v, W * K) * |K| / cov + b`` where ``cov > 0``, and
  exactly 0 where ``cov = 0``.
- The output validity is ``v' = cov > 0``.

Invalid input is selected away (``torch.where``), not multiplied by zero, so an inf or NaN
in a hole never reaches the output, and the gradient there is exactly zero.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskparam import _checks, _compat, _forward
from maskparam.parametrizations import BiasMask, FixedMask

__all__ = [
    "DATA_BIAS_MODES",
    "PartialSequential",
    "coverage",
    "partial_conv",
]

DataBiasMode = Literal["valid", "partial"]
"""The bias modes whose output depends on which input is valid."""

DATA_BIAS_MODES: tuple[str, ...] = get_args(DataBiasMode)

_ConvNd = _compat.ConvNd
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def partial_conv(
    module: nn.Module, input: Tensor, validity: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run a ``"valid"``/``"partial"`` masked conv on ``input`` with explicit validity.

    ``module(input)`` is the same call with every input position valid and only the padding
    invalid; this function takes the validity per sample and returns the output's, so a
    stack of layers can pass holes along. Like :func:`torch.nn.functional.conv2d` it uses
    the module's parameters but not its hooks.

    Args:
        module: A :class:`torch.nn.Conv1d`/2d/3d masked with :func:`~maskparam.apply_mask`
            and ``bias_mode="valid"`` or ``"partial"``.
        input: ``(N, C_in, *spatial)``, or ``(C_in, *spatial)`` unbatched.
        validity: Bool tensor, True at valid input: ``(N, 1, *spatial)`` shared by all input
            channels, or ``(N, C_in, *spatial)`` per channel. A batch of 1 applies to every
            sample. Unbatched input takes unbatched validity. None: all valid.

    Returns:
        ``(output, validity_out)``. ``validity_out`` is a bool tensor, True where the output
        saw valid input (``cov > 0``). It has one channel when every output channel shares
        it by construction (a mask shared by all output channels, with single-channel
        validity or ``groups=1``), else one per output channel; either way it broadcasts
        against the output and is a valid ``validity`` for a next layer.

    Raises:
        TypeError: If ``validity`` is not a bool tensor.
        ValueError: If ``module`` is not a masked conv with such a bias mode, or the shapes
            or devices of ``input`` and ``validity`` do not fit it.

    Example:
        >>> from maskparam.apply import apply_mask
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3, padding=1), [1, 1, 0], bias_mode="partial")
        >>> with torch.no_grad():
        ...     conv.weight = torch.ones(1, 1, 3)
        ...     _ = conv.bias.zero_()
        >>> x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
        >>> v = torch.tensor([[[True, False, False, True]]])
        >>> out, v_out = partial_conv(conv, x, v)
        >>> out.detach()  # rescaled by 2 / 1 where one of two active taps is valid
        tensor([[[2., 2., 0., 8.]]])
        >>> v_out
        tensor([[[ True,  True, False,  True]]])
    """
    conv, mode = _conv_with_mode(module, "partial_conv")
    ndim = len(conv.kernel_size)
    if not isinstance(input, Tensor) or input.dim() not in (ndim + 1, ndim + 2):
        got = f"shape={tuple(input.shape)}" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(
            f"partial_conv expects input of shape (N, C_in, *spatial) or (C_in, *spatial) "
            f"with {ndim} spatial dims for {_checks.layer_name(conv)}. Got input {got}."
        )
    if validity is not None:
        _check_validity(conv, validity, "partial_conv", input)
    if input.dim() == ndim + 1:
        out, valid = partial_conv(
            conv, input.unsqueeze(0), None if validity is None else validity.unsqueeze(0)
        )
        return out.squeeze(0), valid.squeeze(0)
    return _run(conv, input, conv.weight, conv.bias, mode, validity, cache=False)


def coverage(module: nn.Module, validity: Tensor) -> Tensor:
    """How many active taps of a masked conv land on valid input, per output position.

    See the module docstring for what a tap counts with single- and multi-channel validity.
    Padding is invalid. The scale of ``bias_mode="partial"`` is ``coverage`` of an all-valid
    window divided by this.

    Args:
        module: A :class:`torch.nn.Conv1d`/2d/3d, masked or not (unmasked: every tap is
            active), with any bias mode.
        validity: Bool tensor ``(N, 1 or C_in, *spatial)``, or unbatched
            ``(1 or C_in, *spatial)``.

    Returns:
        Counts as a float tensor (float64 for a float64 module, else float32) of shape
        ``(N, 1 or C_out, *out_spatial)``: one channel when all output channels share it.

    Raises:
        TypeError: If ``validity`` is not a bool tensor.
        ValueError: If ``module`` is not a Conv1d/2d/3d or ``validity`` does not fit it.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, padding=1)
        >>> coverage(conv, torch.ones(1, 1, 3, 4, dtype=torch.bool))
        tensor([[[[4., 6., 6., 4.],
                  [6., 9., 9., 6.],
                  [4., 6., 6., 4.]]]])
    """
    _checks.check_module(module, "coverage")
    if not isinstance(module, _ConvNd) or module.transposed:
        raise ValueError(
            "coverage expects a Conv1d, Conv2d or Conv3d (masked or not). "
            f"Got {_checks.layer_name(module)}."
        )
    _check_validity(module, validity, "coverage", None)
    ndim = len(module.kernel_size)
    if validity.dim() == ndim + 1:
        return coverage(module, validity.unsqueeze(0)).squeeze(0)
    weight = _weight_of(module)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    counts = _coverage(module, _mask_of(module), weight.shape, validity, None, dtype, None)
    if validity.shape[1] == 1:
        return counts.cov / weight.shape[1]  # entries per kernel position, see _coverage
    return counts.cov


class PartialSequential(nn.Sequential):
    """A :class:`torch.nn.Sequential` that passes validity along with the features.

    ``forward(input, validity=None)`` returns ``(output, validity_out)``. A conv masked with
    ``bias_mode="valid"`` or ``"partial"`` (and a nested ``PartialSequential``) takes and
    returns validity, see :func:`partial_conv`; any other layer sees only the features and
    must keep their shape (activations, normalization, dropout), so the validity stays as it
    is. For layers that change the shape (pooling, upsampling), write the forward by hand
    with :func:`partial_conv`. The ``state_dict`` keys are those of ``nn.Sequential``.

    Example:
        >>> from maskparam.apply import apply_mask
        >>> cross = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
        >>> net = PartialSequential(
        ...     apply_mask(nn.Conv2d(1, 4, 3, padding=1), cross, bias_mode="partial"),
        ...     nn.ReLU(),
        ...     apply_mask(nn.Conv2d(4, 1, 3, padding=1), cross, bias_mode="partial"),
        ... )
        >>> v = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
        >>> v[0, 0, 2, 2] = True  # one valid pixel
        >>> out, v_out = net(torch.randn(1, 1, 5, 5), v)
        >>> v_out.int()[0, 0]
        tensor([[0, 0, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [1, 1, 1, 1, 1],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 0, 0]], dtype=torch.int32)
    """

    def forward(self, input: Tensor, validity: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the layers in order; return the output and its validity.

        Raises:
            ValueError: If no layer takes validity, or a layer that does not take it changes
                the shape of the features.
        """
        if not any(_takes_validity(layer) for layer in self):
            raise ValueError(
                "PartialSequential expects at least one conv masked with bias_mode='valid' "
                "or 'partial'. Got layers "
                f"{[_checks.layer_name(layer) for layer in self]}; use nn.Sequential for these."
            )
        for i, layer in enumerate(self):
            if isinstance(layer, PartialSequential):
                input, validity = layer(input, validity)
            elif _takes_validity(layer):
                input, validity = partial_conv(layer, input, validity)
            else:
                out = layer(input)
                if not isinstance(out, Tensor) or out.shape != input.shape:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        "PartialSequential expects every layer without validity to keep the "
                        f"shape of its input, so that the validity still fits. Layer {i} "
                        f"({_checks.layer_name(layer)}) turned {tuple(input.shape)} into {got}; "
                        "write the forward with maskparam.partial_conv instead."
                    )
                input = out
        assert validity is not None  # a layer that takes validity always returns one
        return input, validity


# -- the forward of a masked conv with bias_mode "valid" or "partial" ---------------------


def conv_forward(conv: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``_conv_forward`` of a conv with ``bias_mode="valid"``/``"partial"``: all input valid."""
    assert isinstance(conv, _ConvNd)
    mode = conv.__dict__[_forward.BIAS_MODE_ATTR]
    if input.dim() == len(conv.kernel_size) + 1:  # unbatched
        return conv_forward(conv, input.unsqueeze(0), weight, bias).squeeze(0)
    return _run(conv, input, weight, bias, mode, None, cache=True)[0]


_forward.register(_forward.BIAS_MODE_ATTR, conv_forward)


class _Coverage(NamedTuple):
    cov: Tensor  # coverage counted in weight entries
    total: Tensor  # |K| per output channel in weight entries, shaped to broadcast


class _Maps(NamedTuple):
    valid: Tensor  # cov > 0
    scale: Tensor | None  # |K| / cov where valid, 0 elsewhere; None for "valid"


class _Entry(NamedTuple):
    mask: Tensor | None
    key: tuple[Any, ...]
    maps: _Maps


# Maps for all-valid input depend only on shapes and the mask: one entry per module, kept
# outside the module so that deepcopy, pickling and state_dict never see it.
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _run(
    conv: _ConvNd,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mode: str,
    validity: Tensor | None,
    *,
    cache: bool,
) -> tuple[Tensor, Tensor]:
    x = input if validity is None else torch.where(validity, input, 0)
    raw = _conv_zero_padded(conv, x, weight, conv.groups)
    if weight.shape[1] == 0:
        # No input channel, so no valid input: the output is what the plain conv gives
        # (torch gives an empty one), and no output position is valid.
        return raw, torch.zeros(
            (raw.shape[0], 1, *raw.shape[2:]), dtype=torch.bool, device=raw.device
        )
    maps = _maps(conv, weight.shape, input.shape[2:], validity, raw, mode, cache)
    shape = (1, -1) + (1,) * (raw.dim() - 2)
    if mode == "partial":
        assert maps.scale is not None
        out = raw * maps.scale
        if bias is not None:
            out = out + bias.to(raw.dtype).view(shape)
        out = torch.where(maps.valid, out, 0)
    elif bias is None:
        out = raw
    else:
        out = raw + torch.where(maps.valid, bias.to(raw.dtype).view(shape), 0)
    return out, maps.valid


def _maps(
    conv: _ConvNd,
    weight_shape: torch.Size,
    spatial: torch.Size,
    validity: Tensor | None,
    raw: Tensor,
    mode: str,
    cache: bool,
) -> _Maps:
    mask = _mask_of(conv)
    key: tuple[Any, ...] = ()
    # A trace records what runs: computed maps keep the traced graph the same on every call.
    jit_tracing = bool(torch.jit.is_tracing())  # type: ignore[attr-defined, no-untyped-call]
    tracing = torch.compiler.is_compiling() or jit_tracing
    use_cache = cache and validity is None and not tracing
    if use_cache:
        key = (
            None if mask is None else _compat.tensor_version(mask),
            tuple(spatial),
            raw.dtype,
            raw.device,
            # Inference tensors cannot be saved for backward outside inference mode.
            torch.is_inference_mode_enabled(),
            tuple(weight_shape),
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            mode,
        )
        entry = _CACHE.get(conv)
        if entry is not None and entry.mask is mask and entry.key == key:
            return entry.maps
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    counts = _coverage(conv, mask, weight_shape, validity, spatial, dtype, raw.device)
    valid = counts.cov > 0
    scale = None
    if mode == "partial":
        # Counts are whole weight entries, so every positive coverage is at least 1.
        scale = torch.where(valid, counts.total / counts.cov.clamp_min(1), 0).to(raw.dtype)
    maps = _Maps(valid, scale)
    if use_cache:
        _CACHE[conv] = _Entry(mask, key, maps)
    return maps


def _coverage(
    conv: _ConvNd,
    mask: Tensor | None,
    weight_shape: torch.Size,
    validity: Tensor | None,
    spatial: torch.Size | None,
    dtype: torch.dtype,
    device: torch.device | None,
) -> _Coverage:
    """Coverage and ``|K|``, both counted in weight entries (input channel, kernel position).

    Single-channel validity stands for the same validity on every input channel, so there
    both counts are ``C_in / groups`` times the per-position counts of the docs (exactly, for
    masks shared by a filter's input channels); their ratio is the scale either way.
    """
    if validity is None:
        assert spatial is not None
        assert device is not None
        v = torch.ones((1, 1, *spatial), dtype=dtype, device=device)
    else:
        v, device = validity.to(dtype), validity.device
    if mask is None:
        full = torch.ones(weight_shape, dtype=dtype, device=device)
        shared = True
    else:
        full = mask.to(dtype).expand(weight_shape)
        shared = mask.dim() < len(weight_shape) or mask.shape[0] == 1
    groups = 1
    if v.shape[1] == 1:
        kernel = (full[:1] if shared else full).sum(dim=1, keepdim=True)
    elif shared and conv.groups == 1:
        kernel = full[:1]
    else:
        kernel, groups = full, conv.groups
    total = kernel.sum(dim=tuple(range(1, kernel.dim())))
    # Under autocast the conv would run in half precision, which counts exactly only to 2048.
    autocast = torch.is_autocast_enabled(device.type)
    with torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext():
        cov = _conv_zero_padded(conv, v, kernel, groups)
    return _Coverage(cov, total.view((1, -1) + (1,) * (cov.dim() - 2)))


def _conv_zero_padded(conv: _ConvNd, input: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The conv's geometry without bias, padding with zeros whatever its ``padding_mode``.

    Padding is invalid input, so reflected, replicated or wrapped values must not count.
    """
    fn = _CONV[len(conv.kernel_size)]
    if conv.padding_mode == "zeros":
        return fn(input, weight, None, conv.stride, conv.padding, conv.dilation, groups)
    padded = F.pad(input, _compat.reversed_padding(conv))
    return fn(padded, weight, None, conv.stride, 0, conv.dilation, groups)


# -- helpers ------------------------------------------------------------------------------


def _mask_of(conv: nn.Module) -> Tensor | None:
    """The weight's kernel mask, or None for an unmasked conv."""
    for p in _checks.parametrizations_of(conv, "weight"):
        if isinstance(p, FixedMask) and not isinstance(p, BiasMask):
            return p.mask
    return None


def _weight_of(conv: _ConvNd) -> Tensor:
    """The weight as the conv uses it (any parametrization applied), for its shape and device."""
    with torch.no_grad():
        weight: Tensor = conv.weight
    return weight


def _takes_validity(layer: nn.Module) -> bool:
    return isinstance(layer, PartialSequential) or (
        isinstance(layer, _ConvNd) and _forward.BIAS_MODE_ATTR in layer.__dict__
    )


def _conv_with_mode(module: object, caller: str) -> tuple[_ConvNd, str]:
    _checks.check_module(module, caller)
    mode = module.__dict__.get(_forward.BIAS_MODE_ATTR)
    if not isinstance(module, _ConvNd) or mode not in DATA_BIAS_MODES:
        masked = isinstance(module, nn.Module) and _mask_of(module) is not None
        state = "masked with another bias_mode" if masked else "not masked"
        raise ValueError(
            f"{caller} expects a conv masked with bias_mode='valid' or 'partial'. Got "
            f"{_checks.layer_name(module)}, {state}; use "
            "apply_mask(module, mask, bias_mode='partial')."
        )
    return module, mode


def _check_validity(conv: _ConvNd, validity: object, caller: str, input: Tensor | None) -> None:
    """Raise unless ``validity`` is a bool tensor that fits ``conv`` (and ``input``)."""
    if not isinstance(validity, Tensor) or validity.dtype != torch.bool:
        got = (
            f"dtype={validity.dtype}" if isinstance(validity, Tensor) else type(validity).__name__
        )
        raise TypeError(
            f"{caller} expects validity as a bool tensor, True at valid input. Got {got}; "
            "convert 0/1 values with validity.bool()."
        )
    ndim, c_in = len(conv.kernel_size), conv.in_channels
    expected = f"(N or 1, 1 or C_in={c_in}, *spatial)"
    if input is None:
        fits = validity.dim() in (ndim + 1, ndim + 2) and validity.shape[-ndim - 1] in (1, c_in)
        device = _weight_of(conv).device
    else:
        expected += f" for input.shape={tuple(input.shape)}"
        batch_ok = input.dim() == ndim + 1 or validity.shape[0] in (1, input.shape[0])
        fits = (
            validity.dim() == input.dim()
            and batch_ok
            and validity.shape[-ndim - 1] in (1, c_in)
            and validity.shape[-ndim:] == input.shape[-ndim:]
        )
        device = input.device
    if not fits:
        raise ValueError(
            f"{caller} expects validity of shape {expected} ({ndim} spatial dims for "
            f"{_checks.layer_name(conv)}, unbatched if the input is). Got "
            f"validity.shape={tuple(validity.shape)}."
        )
    if validity.device != device:
        raise ValueError(
            f"{caller} expects validity on the device of the "
            f"{'weight' if input is None else 'input'}, {device}. Got {validity.device}."
        )
