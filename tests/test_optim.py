"""The values under a mask never move in a torch.optim step, and cost nothing between steps."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from maskparam import _optim, apply_mask, masks, remove_mask, set_mask

PLUS = masks.cross(3, ndim=2)


def _every_optimizer() -> list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]]:
    """Every optimizer in torch.optim, with weight decay where it takes one."""
    found = []
    for name, cls in vars(torch.optim).items():
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if cls is torch.optim.Optimizer or name in ("SparseAdam", "LBFGS"):
            continue
        params = inspect.signature(cls).parameters
        options: dict[str, object] = {"lr": 0.05}
        if "weight_decay" in params:
            options["weight_decay"] = 0.3
        if "momentum" in params:
            options["momentum"] = 0.9
        found.append((name, lambda p, cls=cls, options=options: cls(p, **options)))
    return found


OPTIMIZERS = _every_optimizer()


def _step(module: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    module(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize(("name", "make"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_values_never_drift_bitwise(
    name: str, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], dtype: torch.dtype
) -> None:
    assert len(OPTIMIZERS) >= 10
    if name == "Muon":  # 2-D parameters only
        layer: nn.Module = nn.Linear(6, 4, bias=False).to(dtype)
        x = torch.randn(3, 6, dtype=dtype)
        mask, bias_mode = (
            torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.5,
            "keep",
        )
    else:
        layer = nn.Conv2d(2, 3, 3, padding=1).to(dtype)
        x = torch.randn(2, 2, 5, 5, dtype=dtype)
        mask, bias_mode = PLUS, "channel"
    opt = make(list(layer.parameters()))  # built before the mask, with state from before it
    for _ in range(2):
        _step(layer, opt, x)
    full = mask.expand(layer.weight.shape)
    before = layer.weight.detach().clone()
    apply_mask(layer, mask, bias_mode=bias_mode)
    for _ in range(4):
        _step(layer, opt, x)
    stored = layer.parametrizations.weight.original
    assert torch.equal(stored[~full], before[~full])
    assert not torch.equal(stored[full], before[full])  # the rest did train
    assert _optim.held_count() == 0


def test_lbfgs_with_a_closure() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), [1, 0, 1])
    before = conv.parametrizations.weight.original.detach().clone()
    opt = torch.optim.LBFGS(conv.parameters(), lr=0.5)
    x = torch.randn(2, 1, 6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (conv(x) - 1).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert conv.parametrizations.weight.original[0, 0, 1] == before[0, 0, 1]


@pytest.mark.parametrize("options", [{"foreach": True}, {"foreach": False}, {"fused": True}])
def test_multi_tensor_and_fused_steps(options: dict[str, bool]) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    before = [m.weight.detach().clone() for m in model]
    for layer in model:
        apply_mask(layer, PLUS)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5, **options)
    for _ in range(3):
        _step(model, opt, torch.randn(1, 2, 7, 7))
    for layer, old in zip(model, before, strict=True):
        assert torch.equal(layer.parametrizations.weight.original[:, :, ~PLUS], old[:, :, ~PLUS])


def test_a_step_that_raises_is_reported_and_never_written_later() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), [1, 0, 1])
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    opt.zero_grad()
    conv(torch.randn(1, 1, 4)).sum().backward()
    stored = conv.parametrizations.weight.original

    def explode(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        with torch.no_grad():
            stored.mul_(0.5)  # half an update...
        raise RuntimeError("boom")  # ...then a failure

    handle = opt.register_step_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    handle.remove()
    assert _optim.held_count() == 1
    moved = stored.detach().clone()
    opt.param_groups[0]["weight_decay"] = 0.0
    stored.grad.zero_()
    with pytest.warns(RuntimeWarning, match=r"SGD step did not finish.*Conv1d\.weight"):
        opt.step()  # drops the old hold: the values stay where the failed step left them
    assert torch.equal(stored.detach(), moved)
    assert _optim.held_count() == 0


def test_set_mask_and_copies_are_protected_too() -> None:
    conv = apply_mask(nn.Conv2d(1, 2, 3), PLUS)
    set_mask(conv, torch.eye(3))
    twin = copy.deepcopy(conv)
    for module in (conv, twin):
        before = module.parametrizations.weight.original.detach().clone()
        opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.5)
        for _ in range(3):
            _step(module, opt, torch.randn(1, 1, 5, 5))
        eye = torch.eye(3, dtype=torch.bool)
        assert torch.equal(module.parametrizations.weight.original[:, :, ~eye], before[:, :, ~eye])


def test_unmasked_layers_train_as_before() -> None:
    conv = nn.Conv2d(1, 2, 3)
    apply_mask(conv, PLUS)
    remove_mask(conv, bake=False)
    before = conv.weight.detach().clone()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    _step(conv, opt, torch.ones(1, 1, 5, 5))
    assert (conv.weight[:, :, ~PLUS] != before[:, :, ~PLUS]).all()  # no longer held


def test_a_masked_model_is_no_larger_than_a_plain_one() -> None:
    model = nn.Sequential(*[nn.Conv2d(64, 64, 3) for _ in range(4)])
    plain = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for layer in model:
        apply_mask(layer, PLUS)
    masked_state = model.state_dict()
    masked = sum(t.numel() * t.element_size() for t in masked_state.values())
    assert masked <= plain * 1.02
    # In memory too: every tensor the model holds, attributes of its modules included.
    held = 0
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                held += value.numel() * value.element_size()
        held += sum(
            t.numel() * t.element_size() for t in module._parameters.values() if t is not None
        )
        held += sum(
            t.numel() * t.element_size() for t in module._buffers.values() if t is not None
        )
    assert held <= plain * 1.02


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    data=st.data(),
    channels_last=st.booleans(),
)
def test_held_values_come_back_for_any_mask_shape(
    shape: list[int], data: st.DataObject, channels_last: bool
) -> None:
    # Every broadcastable mask shape: trailing (a kernel's), leading (per channel), mixed,
    # per element; contiguous or not.
    mask_shape = [data.draw(st.sampled_from([1, size])) for size in shape]
    mask_shape = mask_shape[data.draw(st.integers(0, len(mask_shape))) :]
    off = torch.rand(mask_shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    stored = torch.randn(shape)
    if channels_last and len(shape) == 4:
        stored = stored.to(memory_format=torch.channels_last)
    before = stored.clone()
    held = _optim._Held(stored, _optim._Where(stored, off, []))
    stored.add_(1.0)  # a step moves everything
    held.put_back()
    full = off.expand(stored.shape)
    assert torch.equal(stored[full], before[full])
    assert torch.equal(stored[~full], before[~full] + 1.0)


def test_held_values_of_an_empty_shard() -> None:
    # FSDP2 gives a rank no rows of a small layer: the hold must not trip over it.
    for stored in (torch.randn(0, 4, 3, 3), torch.randn(2, 0, 3, 3)):
        held = _optim._Held(stored, _optim._Where(stored, ~PLUS, []))
        held.put_back()
        assert held.values.numel() == 0
