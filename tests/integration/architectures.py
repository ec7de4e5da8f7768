"""The real architectures the integration tests mask: which layers, with which mask.

torchvision's ResNet-18 (3x3 convs beside a 7x7 stem and 1x1 shortcuts), timm's ConvNeXt-atto
(depthwise 7x7 convs, groups equal to channels) and MONAI's 3-D UNet (Conv3d and
ConvTranspose3d), each built with random weights and fed a small input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from maskparam import masks


@dataclass(frozen=True)
class Architecture:
    """A model to mask, which layers to mask with what, and an input for it."""

    name: str
    build: Callable[[], nn.Module]  # random weights, the same for the same seed
    # For apply_masks: the mask for the layers of one kernel size, None for the others.
    masks: Callable[[str, nn.Module], torch.Tensor | None]
    mask: torch.Tensor  # the one mask that ``masks`` gives
    masked: int  # how many layers ``masks`` selects
    input_shape: tuple[int, ...]

    def input(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))

    def fresh(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=10)


def _convnext_atto() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
    )


CROSS_2D = masks.cross(3, ndim=2)
DIAMOND_7 = masks.diamond(7, ndim=2)  # 25 of the 49 taps
CROSS_3D = masks.cross(3, ndim=3)  # 7 of the 27 taps


def _on_3x3(name: str, m: nn.Module) -> torch.Tensor | None:
    # The 7x7 stem and the 1x1 downsampling shortcuts stay plain.
    return CROSS_2D if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) else None


def _on_depthwise_7x7(name: str, m: nn.Module) -> torch.Tensor | None:
    # ConvNeXt's depthwise convs (groups == channels); the 4x4 stem, the 2x2 downsampling
    # convs and the MLPs (Linear) stay plain.
    is_7x7 = isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7)
    return DIAMOND_7 if is_7x7 and m.groups == m.in_channels == m.out_channels else None


def _on_3x3x3(name: str, m: nn.Module) -> torch.Tensor | None:
    # Conv3d and ConvTranspose3d; MONAI's 1x1x1 residual convs stay plain.
    is_3d = isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    return CROSS_3D if is_3d and m.kernel_size == (3, 3, 3) else None


ARCHITECTURES = [
    Architecture("resnet18", _resnet18, _on_3x3, CROSS_2D, masked=16, input_shape=(2, 3, 32, 32)),
    Architecture(
        "convnext_atto",
        _convnext_atto,
        _on_depthwise_7x7,
        DIAMOND_7,
        masked=12,
        input_shape=(2, 3, 32, 32),
    ),
    Architecture(
        "monai_unet", _monai_unet, _on_3x3x3, CROSS_3D, masked=9, input_shape=(2, 1, 16, 16, 16)
    ),
]
