"""Parametrizations that keep chosen entries of a tensor at exactly zero.

These are plain :mod:`torch.nn.utils.parametrize` parametrizations: they hold a mask and apply
it, and nothing else. Choosing where to register them is the job of :mod:`maskparam.apply`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from maskparam._checks import as_bool_mask

__all__ = ["BiasMask", "FixedMask"]


class FixedMask(nn.Module):
    """Parametrization that sets a tensor to exactly zero wherever ``mask`` is False.

    The masked value is ``torch.where(mask, X, 0)``, recomputed on every access of the
    parametrized tensor. Because it selects rather than multiplies, an inf or NaN stored at a
    masked entry of the original never reaches the weight, the output or any gradient
    (``inf * 0`` would be NaN), and the gradient at masked entries is exactly zero, so the
    masked tensor stays exactly zero there whatever the optimizer does.

    The mask is a boolean buffer named ``mask``: it is saved in ``state_dict``, moved by
    ``.to(device)`` and stays boolean through ``.half()`` or ``.double()``. It may have any
    shape that broadcasts to the parametrized tensor.

    The stored original is an ordinary parameter, so an optimizer still applies weight
    decay, and momentum or Adam state from before masking, to its masked entries: harmless
    for the output, but those entries drift. So the parametrization also keeps ``hidden``:
    the values the mask hides, taken when the original is stored (at registration, or when
    ``module.weight = tensor`` is assigned), zero at the kept entries. Removing the mask
    without baking (:func:`~maskparam.remove_mask` with ``bake=False``) puts them back. It
    travels with ``state_dict`` as this module's extra state (so DDP, which broadcasts
    buffers on every step, does not send it), and with ``.to()``, ``deepcopy`` and pickling.

    Args:
        mask: Boolean tensor, or numbers that are all 0 or 1. True keeps an entry.

    Raises:
        ValueError: If ``mask`` holds values other than 0 and 1, or NaN.

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
    hidden: Tensor | None

    def __init__(self, mask: Any) -> None:
        super().__init__()
        # A copy: the caller's tensor, perhaps given to many layers, must not alias this one.
        self.register_buffer("mask", as_bool_mask(mask, type(self).__name__).clone())
        self.hidden = None  # set by right_inverse when the original is stored

    def forward(self, X: Tensor) -> Tensor:
        """Return ``X`` with the entries where ``mask`` is False set to exactly zero."""
        return torch.where(self.mask, X, 0)

    def right_inverse(self, X: Tensor) -> Tensor:
        """Store ``X`` as given, masked entries included, and remember what the mask hides.

        The forward masks on every access, so the stored values at masked entries never
        matter until the mask is removed with ``bake=False``, which gives them back from
        ``hidden`` even if an optimizer has moved the stored ones since.
        """
        same_kind = self.hidden is None or (
            X.dtype == self.hidden.dtype and X.shape == self.hidden.shape
        )
        if same_kind:  # else parametrize refuses the assignment: keep what we have.
            self.hidden = torch.where(self.mask, 0, X.detach())
        return X

    def get_extra_state(self) -> Tensor | None:
        """``hidden``, saved in ``state_dict`` under ``<prefix>_extra_state``."""
        return self.hidden

    def set_extra_state(self, state: Any) -> None:
        """Load ``hidden`` from a ``state_dict``, onto the device of the mask."""
        if state is not None and not isinstance(state, Tensor):
            raise TypeError(
                f"{type(self).__name__} expects its extra state (the values the mask hides) "
                f"as a tensor or None. Got {type(state).__name__}."
            )
        self.hidden = None if state is None else state.detach().to(self.mask.device, copy=True)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FixedMask:
        # ``hidden`` is a plain attribute, not a buffer: convert and move it like one.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.hidden is not None:
            self.hidden = fn(self.hidden)
        return self

    def extra_repr(self) -> str:
        """Shape and active count, shown in the module's repr."""
        return f"shape={tuple(self.mask.shape)}, active={int(self.mask.sum())}/{self.mask.numel()}"


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
