"""The whole workflow on a ResNet-18-shaped network: mask, train, save, reload, bake.

The network has ResNet-18's layout (a 7x7 stem, four stages of two basic blocks, 1x1
downsampling shortcuts, batch norm) at a small width, and is built here: no downloads.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from maskparam.apply import get_mask
from maskparam.checkpoint import bake_file, bake_state_dict
from maskparam.model import apply_masks, mask_summary, remove_masks

CROSS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages = []
        inplanes = width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cross_on_3x3(name: str, module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
        return CROSS
    return None


THREE_BY_THREE = [
    f"layer{stage}.{block}.conv{conv}"
    for stage in (1, 2, 3, 4)
    for block in (0, 1)
    for conv in (1, 2)
]


def assert_plain_torch(model: nn.Module) -> None:
    """No maskparam left anywhere: classes, modules, attributes, parameters, pickle."""
    for name, module in model.named_modules():
        cls = type(module)
        assert cls in (ResNet18, BasicBlock) or cls.__module__.startswith("torch.nn."), name
        assert not any(c.__module__.startswith("maskparam") for c in cls.__mro__), name
        assert not parametrize.is_parametrized(module), name
        assert not any(attr.startswith("_maskparam") for attr in module.__dict__), name
    for name, param in model.named_parameters():
        assert type(param) is nn.Parameter, name
        assert "parametrizations" not in name
    for name, buffer in model.named_buffers():
        assert type(buffer) is torch.Tensor, name
    assert model.state_dict().keys() == ResNet18().state_dict().keys()
    assert b"maskparam" not in pickle.dumps(model)


def test_resnet18_mask_train_save_reload_bake(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = ResNet18().state_dict()  # A plain checkpoint, as a model zoo ships one.
    model = ResNet18()
    assert apply_masks(model, cross_on_3x3) == THREE_BY_THREE
    model.load_state_dict(pretrained, strict=True)  # Pretrained weights into the masked model.
    for name in THREE_BY_THREE:
        assert torch.equal(get_mask(model.get_submodule(name)), CROSS)

    # Train a few steps, batch norm in training mode.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name in THREE_BY_THREE:
        conv = model.get_submodule(name)
        assert torch.all(conv.weight[..., ~CROSS] == 0)
        assert not torch.equal(conv.parametrizations.weight.original, pretrained[f"{name}.weight"])
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    expected = model(x)

    # mask_summary: the 16 3x3 convs, 5 of 9 taps each.
    summary = mask_summary(model)
    assert [row.name for row in summary.rows] == THREE_BY_THREE
    weights = [model.get_submodule(name).weight.numel() for name in THREE_BY_THREE]
    assert (summary.total.active_taps, summary.total.total_taps) == (16 * 5, 16 * 9)
    assert summary.total.total_params == sum(weights)
    assert summary.total.active_params == sum(n // 9 * 5 for n in weights)
    assert str(summary).splitlines()[-2].split()[1:3] == [
        "80/144",
        f"{sum(n // 9 * 5 for n in weights)}/{sum(weights)}",
    ]
    # The whole model: every parameter, the masked taps the only ones held at zero.
    every = sum(p.numel() for p in model.parameters())
    hidden = sum(weights) - summary.total.active_params
    assert str(summary).splitlines()[-1].split()[:2] == ["whole", "model"]
    assert summary.model_total.total_params == every
    assert summary.model_total.active_params == every - hidden

    # Save and reload: the state_dict into a freshly masked model, and the whole model.
    torch.save(model.state_dict(), tmp_path / "masked.pt")
    fresh = ResNet18()
    apply_masks(fresh, cross_on_3x3)
    fresh.load_state_dict(torch.load(tmp_path / "masked.pt"), strict=True)
    assert torch.equal(fresh.eval()(x), expected)
    torch.save(model, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(whole(x), expected)

    # Bake, three ways: the state_dict, the file, and remove_masks on the reloaded model.
    plain = ResNet18()
    plain.load_state_dict(bake_state_dict(torch.load(tmp_path / "masked.pt")), strict=True)
    assert torch.equal(plain.eval()(x), expected)
    assert len(bake_file(tmp_path / "masked.pt", tmp_path / "plain.pt")) == 16
    from_file = ResNet18()
    from_file.load_state_dict(torch.load(tmp_path / "plain.pt"), strict=True)
    assert torch.equal(from_file.eval()(x), expected)
    assert remove_masks(whole) == THREE_BY_THREE
    assert torch.equal(whole(x), expected)
    for baked in (plain, from_file, whole):
        assert_plain_torch(baked)
        for name in THREE_BY_THREE:
            assert torch.all(baked.get_submodule(name).weight[..., ~CROSS] == 0)
    # The masked model itself is untouched by all of this.
    assert mask_summary(model) == summary
    assert torch.equal(copy.deepcopy(model)(x), expected)
