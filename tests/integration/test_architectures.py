"""The whole workflow on torchvision's ResNet-18, timm's ConvNeXt and MONAI's 3-D UNet.

Mask the layers of one kernel size, train with AdamW and weight decay, save and reload,
load a plain checkpoint, bake, and run the active taps only: what a user does with a model
from a zoo, on the real classes rather than look-alikes.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import pytest
import torch
from architectures import Architecture
from torch import nn
from torch.nn.utils import parametrize

import maskparam
from maskparam import apply_masks, remove_masks


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if maskparam.is_masked(m)}


def assert_masked_taps_zero(model: nn.Module) -> None:
    for name, layer in masked_layers(model).items():
        off = ~maskparam.get_mask(layer)
        assert torch.all(layer.weight[:, :, off] == 0), name


def train(model: nn.Module, arch: Architecture, steps: int = 2) -> None:
    """A few AdamW steps with weight decay, normalisation layers in training mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        optimizer.zero_grad()
        model(arch.input(seed=10 + step)).square().mean().backward()
        optimizer.step()
    model.eval()


def masked(arch: Architecture, seed: int = 0, execution: str = "dense") -> nn.Module:
    model = arch.fresh(seed)
    assert len(apply_masks(model, arch.masks, execution=execution)) == arch.masked
    return model


@dataclass(frozen=True)
class Trained:
    model: nn.Module  # masked, trained, in eval mode; tests copy it before changing it
    before: dict[str, torch.Tensor]  # each masked layer's stored values before training


@pytest.fixture(scope="module")
def trained(arch: Architecture) -> Trained:
    """The masked model after training, built once per architecture for the tests below."""
    model = masked(arch)
    before = {
        name: layer.parametrizations.weight.original.detach().clone()
        for name, layer in masked_layers(model).items()
    }
    train(model, arch)
    return Trained(model, before)


def test_masks_only_the_chosen_kernel_size(arch: Architecture) -> None:
    model = masked(arch)
    chosen = {n for n, m in arch.fresh().named_modules() if arch.masks(n, m) is not None}
    assert set(masked_layers(model)) == chosen
    plain = [
        m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d))
    ]
    assert any(not maskparam.is_masked(m) for m in plain)  # other kernel sizes stay plain
    assert_masked_taps_zero(model)


def test_stays_masked_after_training(trained: Trained) -> None:
    assert_masked_taps_zero(trained.model)
    for name, layer in masked_layers(trained.model).items():
        off = ~maskparam.get_mask(layer)
        original = layer.parametrizations.weight.original
        before = trained.before[name]
        # The active taps trained; weight decay never reached the values under the mask.
        assert torch.equal(original[:, :, off], before[:, :, off]), name
        assert not torch.equal(original[:, :, ~off], before[:, :, ~off]), name


def test_state_dict_roundtrip(arch: Architecture, trained: Trained) -> None:
    buffer = io.BytesIO()
    torch.save(trained.model.state_dict(), buffer)
    buffer.seek(0)
    fresh = masked(arch, seed=1)  # other random weights, the same masks
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    fresh.eval()
    x = arch.input()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained.model(x))
    assert_masked_taps_zero(fresh)


def test_plain_checkpoint_loads_strictly(arch: Architecture) -> None:
    plain = arch.fresh(seed=2)  # the model zoo's checkpoint, from the unmasked model
    model = masked(arch)
    result = model.load_state_dict(plain.state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert_masked_taps_zero(model)
    # The same as zeroing the plain model's masked taps by hand.
    with torch.no_grad():
        for name, layer in masked_layers(model).items():
            target = plain.get_submodule(name)
            assert torch.equal(layer.parametrizations.weight.original, target.weight), name
            target.weight[:, :, ~maskparam.get_mask(layer)] = 0
    model.eval()
    plain.eval()
    x = arch.input()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_bake_keeps_outputs(arch: Architecture, trained: Trained) -> None:
    model = copy.deepcopy(trained.model)
    x = arch.input()
    with torch.no_grad():
        expected = model(x)
    assert len(remove_masks(model)) == arch.masked
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == arch.fresh().state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def masked_taps(arch: Architecture) -> nn.Module:
    """``execution="taps"`` where it applies: ConvTranspose layers run dense (and would warn)."""
    model = arch.fresh()

    def convs(name: str, m: nn.Module) -> torch.Tensor | None:
        return None if isinstance(m, nn.modules.conv._ConvTransposeNd) else arch.masks(name, m)

    def transposed(name: str, m: nn.Module) -> torch.Tensor | None:
        return arch.masks(name, m) if isinstance(m, nn.modules.conv._ConvTransposeNd) else None

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to dense
        count = len(apply_masks(model, convs, execution="taps"))
    if count < arch.masked:
        count += len(apply_masks(model, transposed))
    assert count == arch.masked
    return model


def test_taps_execution_matches_dense(arch: Architecture, trained: Trained) -> None:
    dense = copy.deepcopy(trained.model)
    dense.zero_grad(set_to_none=True)  # the copy keeps training's last gradients
    taps = masked_taps(arch)
    taps.load_state_dict(dense.state_dict(), strict=True)
    taps.eval()  # batch norm in training mode on a batch of 2 magnifies rounding differences
    x = arch.input()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the taps run, no fallback to dense
        out = taps(x)
    expected = dense(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    grads = dict(dense.named_parameters())
    for name, param in taps.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-3, atol=1e-6)

    # It trains with the masks held, and bakes into the same plain model.
    train(taps, arch, steps=1)
    assert_masked_taps_zero(taps)
    with torch.no_grad():
        expected = taps(x)
    remove_masks(taps)
    with torch.no_grad():
        torch.testing.assert_close(taps(x), expected, rtol=1e-4, atol=1e-5)
