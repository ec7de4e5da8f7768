"""A small model with blocks, for the tests of apply_masks, remove_masks and mask_summary."""

from __future__ import annotations

import torch
from torch import nn

from maskparam.apply import is_masked
from maskparam.masks import cross

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.skip = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + self.skip(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


THREE_BY_THREE = ["stem", "blocks.0.conv", "blocks.1.conv"]


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    types = {name: type(m) for name, m in model.named_modules()}
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(
    model: nn.Module, before: tuple[dict[str, type], dict[str, torch.Tensor]]
) -> None:
    types, state = before
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def masked_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_masked(m)]


class UNet3d(nn.Module):
    """A 3-D U-Net's layer mix: 3x3x3 convs, a 2x2x2 down-sampling conv, a 1x1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 2, 3, padding=1)
        self.down = nn.Conv3d(2, 2, 2, stride=2)
        self.mid = nn.Conv3d(2, 2, 3, padding=1)
        self.up = nn.ConvTranspose3d(2, 2, 2, stride=2)
        self.head = nn.Conv3d(2, 1, 1)


CROSS3 = cross(3, ndim=3)


def is_3x3x3(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3)
