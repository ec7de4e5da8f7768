"""maskparam: fixed masks for PyTorch weights, kept exactly zero through any optimizer."""

from maskparam.apply import BiasMode, apply_mask, get_mask, is_masked, remove_mask, set_mask
from maskparam.parametrizations import BiasMask, FixedMask

__version__ = "0.1.0"

__all__ = [
    "BiasMask",
    "BiasMode",
    "FixedMask",
    "__version__",
    "apply_mask",
    "get_mask",
    "is_masked",
    "remove_mask",
    "set_mask",
]
