"""Parametrizations that keep chosen entries of a tensor at exactly zero.

These are plain :mod:`torch.nn.utils.parametrize` parametrizations: they hold a mask and apply
it, and nothing else. Choosing where to register them is the job of :mod:`maskparam.apply`.
"""

from __future__ import annotations

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
    (``inf * 0`` would be NaN), and the gradient at masked entries is exactly zero, so no
    optimizer (momentum, Adam, weight decay) can move them.

    The mask is a boolean buffer named ``mask``: it is saved in ``state_dict``, moved by
    ``.to(device)`` and stays boolean through ``.half()`` or ``.double()``. It may have any
    shape that broadcasts to the parametrized tensor.

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

    def __init__(self, mask: Any) -> None:
        super().__init__()
        self.register_buffer("mask", as_bool_mask(mask, type(self).__name__))

    def forward(self, X: Tensor) -> Tensor:
        """Return ``X`` with the entries where ``mask`` is False set to exactly zero."""
        return torch.where(self.mask, X, 0)

    def right_inverse(self, X: Tensor) -> Tensor:
        """Store ``X`` as given, masked entries included, so nothing of it is lost.

        The forward masks on every access, so the stored values at masked entries never
        matter until the mask is removed with ``bake=False``, which gives them back.
        """
        return X

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
