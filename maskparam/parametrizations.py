"""Parametrizations that keep chosen entries of a tensor at exactly zero.

These are plain :mod:`torch.nn.utils.parametrize` parametrizations: they hold a mask and apply
it, and nothing else. Choosing where to register them is the job of :mod:`maskparam.apply`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from maskparam import _compat
from maskparam._checks import as_bool_mask, layer_class

__all__ = ["BiasMask", "FixedMask", "channel_activity"]


class FixedMask(nn.Module):
    """Parametrization that sets a tensor to exactly zero wherever ``mask`` is False.

    The masked value is ``torch.where(mask, X, 0)``, recomputed on every access of the
    parametrized tensor. Because it selects rather than multiplies, an inf or NaN stored at a
    masked entry of the original never reaches the weight, the output or any gradient
    (``inf * 0`` would be NaN), and the gradient at masked entries is exactly zero, so the
    masked tensor stays exactly zero there whatever the optimizer does.

    The mask is a boolean buffer named ``mask``: it is saved in ``state_dict``, moved by
    ``.to(device)`` and stays boolean through ``.half()`` or ``.double()``. It may have any
    shape that broadcasts to the parametrized tensor. A mask is a fixed property of the
    layer, not data: on the meta device it keeps its values aside, and
    :meth:`~torch.nn.Module.to_empty` gives the new buffer those values instead of
    uninitialised memory.

    The stored original keeps its values at masked entries: they are what
    :func:`~maskparam.remove_mask` with ``bake=False`` gives back. Weight decay, and momentum
    or Adam state from before masking, would move them inside an optimizer step, so on a
    module masked by :func:`~maskparam.apply_mask` maskparam holds them aside for the length
    of every :mod:`torch.optim` step and puts them back bitwise afterwards
    (``maskparam._optim``). Between steps there is no copy: a masked layer costs its
    weights and its mask.

    Args:
        mask: Boolean tensor, or numbers that are all 0 or 1. True keeps an entry.

    Raises:
        TypeError: If ``mask`` is not tensor-like, or is complex, sparse or nested.
        ValueError: If ``mask`` holds values other than 0 and 1, or NaN, or none (meta).

    Example:
        >>> from torch.nn.utils import parametrize
        >>> conv = nn.Conv1d(1, 1, 3, bias=False)
        >>> _ = parametrize.register_parametrization(
        ...     conv, "weight", FixedMask(torch.tensor([True, False, True])))
        >>> conv.weight = torch.ones(1, 1, 3)
        >>> conv.weight
        tensor([[[1., 0., 1.]]], grad_fn=<WhereBackward0>)
    """

    mask: Tensor

    def __init__(self, mask: Any) -> None:
        super().__init__()
        # A copy, made outside inference mode so that autograd may save it later: the
        # caller's tensor, perhaps given to many layers, must not alias this one.
        with torch.inference_mode(False):
            values = as_bool_mask(mask, type(self).__name__).clone()
        self.register_buffer("mask", values)
        self._stored = False  # the first right_inverse is parametrize storing the original

    @property
    def values(self) -> Tensor:
        """The mask's values as a real tensor: the buffer, or its copy aside while on meta."""
        values: Tensor = self.__dict__["_meta_values"] if self.mask.is_meta else self.mask
        return values

    def set_mask(self, mask: Tensor, device: torch.device | None = None) -> None:
        """Replace the mask buffer by a copy of ``mask`` (bool), on ``device`` or its own.

        Masks on the meta device keep their values aside on the CPU.
        """
        device = self.mask.device if device is None else device
        with torch.inference_mode(False):
            self.mask = mask.to(device=device, dtype=torch.bool, copy=True)
            self._keep_values_aside(mask)

    def _keep_values_aside(self, source: Tensor) -> None:
        """On meta, keep a CPU copy of ``source`` (real values); elsewhere, keep none."""
        if self.mask.is_meta:
            self.__dict__["_meta_values"] = source.detach().to("cpu", torch.bool, copy=True)
        else:
            self.__dict__.pop("_meta_values", None)

    def forward(self, X: Tensor) -> Tensor:
        """Return ``X`` with the entries where ``mask`` is False set to exactly zero."""
        return torch.where(self.mask, X, 0)

    def right_inverse(self, X: Tensor) -> Tensor:
        """Store ``X`` as given, masked entries included.

        When the parametrization is registered, ``X`` is the parameter itself and is kept.
        Assigned later (``module.weight = t``), ``X`` is copied onto the mask's device, so
        the stored original never shares memory with the caller's ``t``.
        """
        if not self._stored:
            self._stored = True
            return X
        with torch.inference_mode(False):
            return X.detach().to(self.mask.device, copy=True)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FixedMask:
        # A conversion must not change which entries are masked: ``to_empty`` would give the
        # buffer uninitialised memory. Give the new buffer the mask's own values.
        source = self.values
        before = self.mask
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.mask is not before and not self.mask.is_meta:
            with torch.no_grad():
                self.mask.copy_(source.to(self.mask.device))
        self._keep_values_aside(source)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written by maskparam 0.1.x saved the hidden values as extra state; a
        # masked module folds them into its original before this runs (may be dropped in
        # 1.0). Here they are only dropped, so that a strict load does not call them unexpected.
        state_dict.pop(f"{prefix}{_compat.EXTRA_STATE_KEY}", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not self.mask.is_meta:  # a load with assign=True may have materialised it
            self.__dict__.pop("_meta_values", None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles written by maskparam 0.1.x carry ``hidden``; the masked module folds it in
        # (_module_class.read_0_1_pickle; may be dropped in 1.0).
        state.setdefault("_stored", True)
        super().__setstate__(state)  # type: ignore[no-untyped-call]

    def extra_repr(self) -> str:
        """Shape and active count, shown in the module's repr."""
        values = self.values
        return f"shape={tuple(values.shape)}, active={int(values.sum())}/{values.numel()}"


class BiasMask(FixedMask):
    """Parametrization of a bias that ``bias_mode`` holds at zero for some output channels.

    It behaves exactly like :class:`FixedMask` on the bias: a channel whose mask entry is
    False has a bias of exactly zero and gets zero gradient. ``mode`` records why:

    - ``"zero"``: every entry is False, the bias is held at zero.
    - ``"channel"``: False for the output channels whose filter has no active tap, so a
      fully masked filter outputs exactly zero.

    Args:
        mask: Boolean tensor of the bias's shape.
        mode: ``"zero"`` or ``"channel"``.

    Example:
        >>> BiasMask(torch.tensor([True, False]), mode="channel")
        BiasMask(mode='channel', shape=(2,), active=1/2)
    """

    def __init__(self, mask: Any, mode: Literal["zero", "channel"]) -> None:
        super().__init__(mask)
        if mode not in ("zero", "channel"):
            raise ValueError(f"BiasMask expects mode 'zero' or 'channel'. Got {mode!r}.")
        self.mode = mode

    def extra_repr(self) -> str:
        """Mode, shape and active count, shown in the module's repr."""
        return f"mode={self.mode!r}, {super().extra_repr()}"


def channel_activity(module: nn.Module, weight_shape: Sequence[int], mask: Tensor) -> Tensor:
    """One bool per output channel: does its filter keep at least one entry under ``mask``?

    Computed where ``mask`` lives (a meta model's mask is a CPU one).

    Raises:
        ValueError: If the module's kind does not say which weight entries feed which output
            channel.
    """
    base = layer_class(module)
    full = mask.expand(tuple(weight_shape))
    if issubclass(base, _compat.ConvNd) and module.transposed:
        # ConvTranspose weight is (in, out // groups, *k); output channel g * (out // groups) + j
        # reads the in-channels of group g.
        groups: int = module.groups  # type: ignore[assignment]
        taps = math.prod(full.shape[2:])
        per_group = full.reshape(groups, full.shape[0] // groups, full.shape[1], taps)
        return per_group.any(dim=3).any(dim=1).reshape(-1)
    if issubclass(base, (_compat.ConvNd, nn.Linear, nn.Bilinear)):
        return full.flatten(1).any(dim=1)
    raise ValueError(
        "bias_mode='channel' needs to know which weight entries feed each output channel, "
        "which it knows for Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and Bilinear. "
        f"Got {base.__name__}; use bias_mode='keep' or 'zero'."
    )
