"""The summary of a masked model: active taps and parameters per masked layer, and totals."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _walk
from maskparam.parametrizations import FixedMask

__all__ = ["LayerSummary", "MaskSummary", "mask_summary"]


@dataclass(frozen=True)
class LayerSummary:
    """One masked layer in a :class:`MaskSummary`.

    A *tap* is one position of a conv kernel: a 3x3 kernel has 9. A tap is active when at
    least one of the layer's filters uses it, so for a mask of the kernel's spatial shape
    the active taps are the mask's True entries, and for a per-channel or per-element mask
    they are the kernel positions that any (output, input) channel pair keeps. Layers
    without a spatial kernel (Linear, say) have no taps: ``kernel`` and the tap counts are
    None. A parameter is one entry of any of the layer's own parameters (weight, bias, ...);
    it is active unless a mask holds it at zero.

    Attributes:
        name: Qualified module name.
        type: The layer's class name, such as ``"Conv2d"``.
        kernel: The kernel size, or None.
        active_taps: Kernel positions in use, or None.
        total_taps: Kernel positions, or None.
        active_params: Parameter entries not held at zero by a mask.
        total_params: Parameter entries.
    """

    name: str
    type: str
    kernel: tuple[int, ...] | None
    active_taps: int | None
    total_taps: int | None
    active_params: int
    total_params: int


@dataclass(frozen=True)
class MaskSummary:
    """What :func:`mask_summary` returns: one row per masked layer, with two totals.

    ``str(summary)`` (or ``print(summary)``) gives the table; the rows and the totals are
    plain data for code. The table ends with two rows: ``total``, the sums over the masked
    layers above it (:attr:`total`), and ``whole model``, the same counts over every
    parameter of the model, masked or not (:attr:`model_total`).

    Attributes:
        rows: One :class:`LayerSummary` per masked layer, in module order.
        model_total: The whole model as one row named ``"whole model"``: its taps over every
            conv layer (an unmasked layer uses all of its taps), its parameters over every
            parameter of the model (shared ones once), active unless a mask holds them at
            zero.
    """

    rows: tuple[LayerSummary, ...]
    model_total: LayerSummary

    @property
    def total(self) -> LayerSummary:
        """The column sums over the masked layers as a row named ``"total"``.

        Taps are summed only over layers with taps (None if there are none).
        """
        return _sum_rows("total", self.rows)

    def __str__(self) -> str:
        header = ("name", "type", "kernel", "active taps", "active params")
        lines = [
            header,
            *(_cells(row) for row in self.rows),
            _cells(self.total, total=True),
            _cells(self.model_total, total=True),
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = []
        for line in lines:
            left = [cell.ljust(width) for cell, width in zip(line[:3], widths[:3], strict=True)]
            right = [cell.rjust(width) for cell, width in zip(line[3:], widths[3:], strict=True)]
            text.append("  ".join(left + right).rstrip())
        return "\n".join(text)


def mask_summary(model: nn.Module) -> MaskSummary:
    """Summarise the masks in ``model``: active taps and parameters per masked layer.

    Two totals follow the rows: ``total`` over the masked layers, and ``whole model`` over
    every parameter of ``model``, masked or not, so the share of the whole network that a
    mask switches off is one line.

    Args:
        model: Any model; layers without a mask have no row but count in ``whole model``.

    Returns:
        A :class:`MaskSummary`: print it for a table, or read its ``rows``, ``total`` and
        ``model_total``.

    Raises:
        TypeError: If ``model`` is not a module.

    Example:
        >>> model = nn.Sequential(
        ...     nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(4, 2, bias=False), nn.Conv2d(2, 1, 1)
        ... )
        >>> plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        >>> from maskparam.model import apply_masks
        >>> _ = apply_masks(model, {"0": plus, "2": torch.tensor([1, 1, 0, 0])})
        >>> summary = mask_summary(model)
        >>> print(summary)
        name         type    kernel  active taps  active params
        0            Conv2d  3x3             5/9  12/20 (60.0%)
        2            Linear  -                 -    4/8 (50.0%)
        total                                5/9  16/28 (57.1%)
        whole model                         6/10  19/31 (61.3%)
        >>> summary.total.active_params, summary.model_total.total_params
        (16, 31)
    """
    _checks.check_module(model, "mask_summary")
    rows: list[LayerSummary] = []
    others: list[LayerSummary] = []  # the unmasked layers, for the whole model's taps
    for name, module in _walk.layers(model):
        (rows if _walk.masked_tensors(module) else others).append(_summarise(name, module))
    masked = _sum_rows("total", rows)
    # Parameters by identity, so a shared one counts once; a mask hides only its own layer's.
    total_params = sum(p.numel() for p in model.parameters())
    hidden = masked.total_params - masked.active_params
    model_total = dataclasses.replace(
        _sum_rows("whole model", [*rows, *others]),
        active_params=total_params - hidden,
        total_params=total_params,
    )
    return MaskSummary(tuple(rows), model_total)


# -- helpers ------------------------------------------------------------------------------


def _summarise(name: str, module: nn.Module) -> LayerSummary:
    kernel: tuple[int, ...] | None = None
    active_taps = total_taps = None
    if isinstance(module, _compat.ConvNd):
        kernel = tuple(module.kernel_size)
        total_taps = 1
        for size in kernel:
            total_taps *= size
        weight_mask = _combined_mask(module, "weight")
        if weight_mask is None:
            active_taps = total_taps
        else:
            # Weight is (out, in / groups, *kernel), or (in, out / groups, *kernel) transposed.
            active_taps = int(weight_mask.flatten(0, 1).any(dim=0).sum())
    active = total = 0
    for _, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
        active += tensor.numel()
        total += tensor.numel()
    if parametrize.is_parametrized(module):
        chains: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
        for tensor_name, chain in chains.items():
            size = sum(p.numel() for p in chain.parameters(recurse=False))
            total += size
            mask = _combined_mask(module, tensor_name)
            active += size if mask is None else int(mask.sum())
    return LayerSummary(
        name=name,
        type=_checks.layer_class(module).__name__,
        kernel=kernel,
        active_taps=active_taps,
        total_taps=total_taps,
        active_params=active,
        total_params=total,
    )


def _sum_rows(name: str, rows: Iterable[LayerSummary]) -> LayerSummary:
    """The column sums of ``rows`` as one row; taps only over the rows that have taps."""
    rows = list(rows)
    taps = [r for r in rows if r.total_taps is not None]
    return LayerSummary(
        name=name,
        type="",
        kernel=None,
        active_taps=sum(r.active_taps or 0 for r in taps) if taps else None,
        total_taps=sum(r.total_taps or 0 for r in taps) if taps else None,
        active_params=sum(r.active_params for r in rows),
        total_params=sum(r.total_params for r in rows),
    )


def _combined_mask(module: nn.Module, tensor_name: str) -> Tensor | None:
    """The masks on ``module.<tensor_name>``, combined and expanded to its full shape."""
    chain = _checks.parametrizations_of(module, tensor_name)
    masks = [p.mask for p in chain if isinstance(p, FixedMask)]
    if not masks:
        return None
    shape = module.parametrizations[tensor_name].original.shape  # type: ignore[index, union-attr]
    combined = torch.ones(shape, dtype=torch.bool, device=masks[0].device)
    for mask in masks:
        combined &= mask.to(combined.device)
    return combined


def _cells(row: LayerSummary, *, total: bool = False) -> tuple[str, ...]:
    kernel = "x".join(map(str, row.kernel)) if row.kernel is not None else "-"
    taps = f"{row.active_taps}/{row.total_taps}" if row.total_taps is not None else "-"
    share = f" ({100 * row.active_params / row.total_params:.1f}%)" if row.total_params else ""
    params = f"{row.active_params}/{row.total_params}{share}"
    if total:
        return (row.name, "", "", taps, params)
    return (row.name, row.type, kernel, taps, params)
