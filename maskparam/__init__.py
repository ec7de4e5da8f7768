"""maskparam: fixed masks for PyTorch weights, kept exactly zero through any optimizer."""

from maskparam import masks
from maskparam.apply import BiasMode, apply_mask, get_mask, is_masked, remove_mask, set_mask
from maskparam.checkpoint import bake_state_dict
from maskparam.model import apply_masks, remove_masks
from maskparam.parametrizations import BiasMask, FixedMask
from maskparam.partial import PartialSequential, coverage, partial_conv
from maskparam.plot import plot_mask
from maskparam.summary import LayerSummary, MaskSummary, mask_summary

__version__ = "0.2.0"

__all__ = [
    "BiasMask",
    "BiasMode",
    "FixedMask",
    "LayerSummary",
    "MaskSummary",
    "PartialSequential",
    "__version__",
    "apply_mask",
    "apply_masks",
    "bake_state_dict",
    "coverage",
    "get_mask",
    "is_masked",
    "mask_summary",
    "masks",
    "partial_conv",
    "plot_mask",
    "remove_mask",
    "remove_masks",
    "set_mask",
]
