"""Where the optimizer hold applies and where it does not, and the errors at its edges.

The README's "When the hold applies" section states each of these; the tests keep it true.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel

from maskparam import FixedMask, apply_mask, get_mask, masks

PLUS = masks.cross(3, ndim=2)


def _masked_conv(**options: object) -> nn.Conv2d:
    torch.manual_seed(0)
    return apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS, **options)  # type: ignore[arg-type]


def _train(module: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        module(torch.randn(2, 2, 5, 5)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "layer", [nn.Embedding(5, 3, sparse=True), nn.EmbeddingBag(5, 3, sparse=True)]
)
def test_exception_sparse_gradients(layer: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"gradients are dense.*sparse=True"):
        apply_mask(layer, torch.ones(5, 3))
    assert not parametrize.is_parametrized(layer)


def test_a_dense_embedding_is_masked_and_trains() -> None:
    embedding = apply_mask(nn.Embedding(5, 3), torch.rand(5, 3) > 0.5)
    embedding(torch.tensor([0, 1, 4])).sum().backward()
    assert embedding.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("saved", ["channel", "zero"])
def test_exception_checkpoint_bias_mode_does_not_fit(saved: str) -> None:
    checkpoint = _masked_conv(bias_mode=saved).state_dict()
    model = _masked_conv(bias_mode="keep")
    with torch.no_grad():
        model.bias.fill_(7.0)
    for strict in (True, False):  # like a size mismatch: the tensor is there, but misfits
        with pytest.raises(RuntimeError, match=r"'zero' or 'channel'.*bias_mode='keep'"):
            model.load_state_dict(checkpoint, strict=strict)
        assert "bias" in model._parameters
        assert (model.bias == 7.0).all()


def test_a_checkpoint_with_a_plain_bias_loads_into_any_bias_mode() -> None:
    checkpoint = _masked_conv().state_dict()
    model = _masked_conv(bias_mode="channel")
    model.load_state_dict(checkpoint)
    assert torch.equal(model.parametrizations.bias.original, checkpoint["bias"])


def test_averaged_model_without_buffers_averages_a_masked_model() -> None:
    conv = _masked_conv()
    average = AveragedModel(conv, use_buffers=False)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        _train(conv, opt, steps=1)
        average.update_parameters(conv)
    averaged = average.module
    assert torch.equal(get_mask(averaged), PLUS)
    assert (averaged.weight[:, :, ~PLUS] == 0).all()
    # Its stored values under the mask are the average of values the hold kept still.
    stored = averaged.parametrizations.weight.original
    assert torch.equal(stored[:, :, ~PLUS], conv.parametrizations.weight.original[:, :, ~PLUS])
    x = torch.randn(1, 2, 5, 5)
    assert averaged(x).shape == conv(x).shape


def test_a_fixed_mask_registered_by_hand_is_not_held() -> None:
    conv = nn.Conv2d(2, 3, 3)
    parametrize.register_parametrization(conv, "weight", FixedMask(PLUS))
    stored = conv.parametrizations.weight.original
    before = stored.detach().clone()
    _train(conv, torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5), steps=1)
    assert (conv.weight[:, :, ~PLUS] == 0).all()  # the mask itself works as always
    assert not torch.equal(stored[:, :, ~PLUS], before[:, :, ~PLUS])  # weight decay moved them


def test_an_optimizers_own_post_hook_runs_before_the_put_back() -> None:
    conv = _masked_conv()
    stored = conv.parametrizations.weight.original
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    seen = []
    opt.register_step_post_hook(lambda *args: seen.append(stored[:, :, ~PLUS].clone()))
    before = stored[:, :, ~PLUS].clone()
    _train(conv, opt, steps=1)
    assert not torch.equal(seen[0], before)  # the hook saw the step's values...
    assert torch.equal(stored[:, :, ~PLUS], before)  # ...which were then put back


def test_exception_checkpoint_masks_a_tensor_this_model_does_not() -> None:
    checkpoint = _masked_conv().state_dict()  # the weight masked
    model = apply_mask(nn.Conv2d(2, 3, 3, padding=1), [True, False, True], name="bias")
    with pytest.raises(RuntimeError, match=r"holds a masked weight.*Conv2d\.weight is not masked"):
        model.load_state_dict(checkpoint)
