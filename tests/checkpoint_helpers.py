"""A small masked model and its plain twin, for the tests of checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from maskparam.apply import apply_mask
from maskparam.model import apply_masks

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
CORNERS = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)


def plain_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ConvTranspose2d(3, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 4),
    )


def masked_net(mask: torch.Tensor = PLUS, bias_mode: str = "channel") -> nn.Sequential:
    net = plain_net()
    per_channel = torch.tensor([1, 0, 1], dtype=torch.bool).reshape(3, 1, 1, 1)
    apply_masks(net, {"0": mask, "3": per_channel & mask, "4": mask}, bias_mode=bias_mode)  # type: ignore[arg-type]
    apply_mask(net[6], torch.rand(4, 72) > 0.5, bias_mode="zero")
    return net


def trained(net: nn.Module, steps: int = 3) -> nn.Module:
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        loss = net(torch.randn(4, 2, 4, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


X = torch.randn(2, 2, 4, 4)
LAYERS = ("0", "3", "4", "6")  # The masked ones.
