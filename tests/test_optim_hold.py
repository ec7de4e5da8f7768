"""The optimizer hold under real training loops: failures, tied weights, threads, compile.

Each masked original's values under the mask are held aside for the length of a step. These
tests check the promises around that: a hold never outlives its step to write stale values,
custom and unhashable optimizers are held, tied parameters train wherever one of their layers
keeps a tap, threads and ``torch.compile(opt.step)`` work, and a step costs time in
proportion to the optimizer's own parameters.
"""

from __future__ import annotations

import copy
import gc
import textwrap
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import FixedMask, _optim, apply_mask, masks, remove_mask, set_mask
from tests.helpers import run_python

PLUS = masks.cross(3, ndim=2)


def _conv(**options: object) -> nn.Conv2d:
    torch.manual_seed(0)
    return apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS, **options)  # type: ignore[arg-type]


def _backward(module: nn.Module) -> None:
    module(torch.randn(2, 2, 5, 5)).square().mean().backward()


def _fail_step(optimizer: torch.optim.Optimizer, move: nn.Parameter | None = None) -> None:
    """A step that raises: before any update, or after moving ``move`` by half."""

    def explode(opt: object, args: object, kwargs: object) -> None:
        if move is not None:
            with torch.no_grad():
                move.mul_(0.5)
        raise RuntimeError("bad batch")

    handle = optimizer.register_step_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="bad batch"):
            optimizer.step()
    finally:
        handle.remove()


# -- a hold never outlives its step -----------------------------------------------------------


def test_a_closure_that_raises_then_bake_leaves_the_baked_weight_alone() -> None:
    linear = apply_mask(nn.Linear(4, 4), torch.rand(4, 4) > 0.5)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1, weight_decay=0.5)
    linear(torch.randn(2, 4)).sum().backward()

    def closure() -> torch.Tensor:
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        opt.step(closure)
    remove_mask(linear, bake=True)
    baked = linear.weight.detach().clone()
    for param in linear.parameters():
        param.grad = torch.zeros_like(param)
    opt.param_groups[0]["weight_decay"] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing had moved: nothing to report
        opt.step()
    assert torch.equal(linear.weight.detach(), baked)
    assert _optim.held_count() == 0


def test_a_failed_step_never_writes_over_a_loaded_checkpoint() -> None:
    conv = _conv()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    _fail_step(opt, move=conv.parametrizations.weight.original)
    checkpoint = {"weight": torch.randn(3, 2, 3, 3), "bias": torch.randn(3)}
    with pytest.warns(RuntimeWarning, match="did not finish"):
        conv.load_state_dict(checkpoint)  # the load drops the hold: its values are newer
    assert _optim.held_count() == 0
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.zero_grad()
    opt.step()
    assert torch.equal(conv.parametrizations.weight.original.detach(), checkpoint["weight"])


def test_a_failed_step_never_writes_over_taps_set_mask_switched_on() -> None:
    conv = _conv()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    original = conv.parametrizations.weight.original
    _fail_step(opt)
    set_mask(conv, torch.ones(3, 3))
    with torch.no_grad():
        original.fill_(2.0)  # trained meanwhile, say
    opt.zero_grad()
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()
    assert (original == 2.0).all()


def test_a_failed_step_that_moved_values_is_reported_once_by_layer() -> None:
    conv = _conv()
    linear = apply_mask(nn.Linear(3, 3), torch.eye(3))
    opt = torch.optim.SGD([*conv.parameters(), *linear.parameters()], lr=0.1)
    _backward(conv)
    _fail_step(opt, move=conv.parametrizations.weight.original)
    moved = conv.parametrizations.weight.original.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"SGD step did not finish") as record:
        opt.step()
    messages = [str(w.message) for w in record if w.category is RuntimeWarning]
    assert len(messages) == 1
    assert "Conv2d.weight" in messages[0]
    assert "Linear" not in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # reported once: this step holds and puts back as usual
    full = PLUS.expand(moved.shape)
    assert torch.equal(conv.parametrizations.weight.original[~full], moved[~full])


def test_held_values_go_into_the_tensor_the_parameter_holds_at_the_end() -> None:
    class Rebinding(torch.optim.Optimizer):
        """Decoupled weight decay that rebinds ``p.data`` instead of writing in place."""

        def __init__(self, params: object) -> None:
            super().__init__(params, {"lr": 0.1, "wd": 0.5})  # type: ignore[arg-type]

        @torch.no_grad()
        def step(self, closure: object = None) -> None:  # type: ignore[override]
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data = p.data * (1 - group["lr"] * group["wd"]) - group["lr"] * p.grad

    for mask in (PLUS, torch.tensor([1, 0, 1]).bool().view(3, 1, 1, 1), torch.rand(3, 2, 3, 3)):
        conv = apply_mask(nn.Conv2d(2, 3, 3), mask > 0.5 if mask.is_floating_point() else mask)
        off = ~torch.broadcast_to(conv.parametrizations.weight[0].mask, (3, 2, 3, 3))
        before = conv.parametrizations.weight.original.detach().clone()
        opt = Rebinding(conv.parameters())
        _backward(conv)
        opt.step()
        after = conv.parametrizations.weight.original
        assert torch.equal(after[off], before[off])
        assert not torch.equal(after[~off], before[~off])


def test_an_unhashable_optimizer_is_held() -> None:
    class Unhashable(torch.optim.SGD):
        def __eq__(self, other: object) -> bool:
            return self is other

    assert Unhashable.__hash__ is None
    conv = _conv()
    before = conv.parametrizations.weight.original.detach().clone()
    opt = Unhashable(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    opt.step()
    after = conv.parametrizations.weight.original
    assert torch.equal(after[:, :, ~PLUS], before[:, :, ~PLUS])
    assert _optim.held_count() == 0


# -- tied weights --------------------------------------------------------------------------


def test_tied_weights_train_wherever_either_layer_keeps_a_tap() -> None:
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    keep_a = torch.zeros(4, 4, dtype=torch.bool)
    keep_a[0] = True
    keep_b = torch.zeros(4, 4, dtype=torch.bool)
    keep_b[1] = True
    keep_b[0, 0] = True
    apply_mask(a, keep_a)
    apply_mask(b, keep_b)
    shared = a.parametrizations.weight.original
    assert shared is b.parametrizations.weight.original
    before = shared.detach().clone()
    opt = torch.optim.AdamW([shared], lr=0.1, weight_decay=0.5)
    x = torch.randn(3, 4)
    (a(x).square().sum() + b(x).square().sum()).backward()
    opt.step()
    either = keep_a | keep_b
    assert (shared[either] != before[either]).all()  # both layers' taps trained
    assert torch.equal(shared[~either], before[~either])  # held where both mask
    remove_mask(a, bake=False)  # now only b masks it: a plain a trains every entry
    opt.zero_grad()
    (a(x).square().sum() + b(x).square().sum()).backward()
    held = shared.detach().clone()
    opt.step()
    assert (shared != held).any()


# -- threads, registry, cost ----------------------------------------------------------------


def test_steps_while_another_thread_copies_masked_modules() -> None:
    model = nn.ModuleList([_conv() for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = [m.parametrizations.weight.original.detach().clone() for m in model]
    errors: list[BaseException] = []

    def copier() -> None:
        try:
            for round in range(30):
                copies = [copy.deepcopy(model) for _ in range(3)]
                del copies
                if round % 10 == 0:
                    gc.collect()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    thread = threading.Thread(target=copier)
    thread.start()
    steps = 0
    while thread.is_alive() or steps < 5:
        opt.zero_grad()
        x = torch.randn(1, 2, 5, 5)
        sum(layer(x).sum() for layer in model).backward()
        opt.step()
        steps += 1
    thread.join()
    assert not errors
    for layer, old in zip(model, before, strict=True):
        stored = layer.parametrizations.weight.original
        assert torch.equal(stored[:, :, ~PLUS], old[:, :, ~PLUS])


def test_a_step_looks_only_at_the_optimizers_own_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    others = [_conv() for _ in range(200)]
    conv = _conv()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    opt.step()  # a new optimizer checks the registry once
    looked: list[int] = []
    real = _optim._Owners.where

    def counting(self: _optim._Owners, param: torch.Tensor) -> object:
        looked.append(id(param))
        return real(self, param)

    monkeypatch.setattr(_optim._Owners, "where", counting)
    monkeypatch.setattr(_optim, "_register", lambda module: pytest.fail("a scan"))
    for _ in range(3):
        opt.step()
    assert looked == [id(conv.parametrizations.weight.original)] * 3
    assert len(others) == 200


def test_a_step_holds_what_the_current_mask_masks_after_many_changes() -> None:
    conv = _conv()
    stored = conv.parametrizations.weight.original
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    gen = torch.Generator().manual_seed(0)
    for round in range(20):
        for _ in range(round % 3):  # masks that no step ever sees, freed again
            set_mask(conv, torch.rand(3, 3, generator=gen) > 0.5)
        mask = torch.rand(3, 3, generator=gen) > 0.5
        set_mask(conv, mask)
        if round % 4 == 0:  # edited in place: same tensor, new version
            with torch.no_grad():
                conv.parametrizations.weight[0].mask.logical_not_()
            mask = ~mask
        before = stored.detach().clone()
        _backward(conv)
        opt.step()
        assert torch.equal(stored[:, :, ~mask], before[:, :, ~mask])
        if mask.any():
            assert not torch.equal(stored[:, :, mask], before[:, :, mask])


def test_the_registry_forgets_modules_that_are_gone() -> None:
    gc.collect()
    start = len(_optim._registry)
    layers = [_conv() for _ in range(20)]
    assert len(_optim._registry) == start + 20
    del layers
    gc.collect()
    assert len(_optim._registry) == start


def test_a_load_with_assign_and_a_new_optimizer_are_held() -> None:
    conv = _conv()
    fresh = {k: v.clone() for k, v in _conv().state_dict().items()}
    conv.load_state_dict(fresh, assign=True)
    stored = conv.parametrizations.weight.original
    before = stored.detach().clone()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    opt.step()
    assert torch.equal(stored[:, :, ~PLUS], before[:, :, ~PLUS])


# -- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_a_compiled_step_through_mask_changes_and_garbage_collection(backend: str) -> None:
    gc.collect()
    conv = _conv()
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, weight_decay=0.5)
    step = torch.compile(opt.step, backend=backend)
    stored = conv.parametrizations.weight.original
    per_channel = torch.tensor([True, False, True]).view(3, 1, 1, 1)
    threshold = gc.get_threshold()
    try:
        for mask in (PLUS, per_channel, torch.rand(3, 2, 3, 3) > 0.5):
            set_mask(conv, mask)  # a mask of another shape each time
            dropped = [_conv() for _ in range(5)]
            for layer in dropped:
                layer.cycle = layer  # freed only by the garbage collector
            del dropped, layer
            gc.set_threshold(1)  # collect often, during the trace too
            off = ~torch.broadcast_to(mask, stored.shape)
            before = stored.detach().clone()
            _backward(conv)
            step()
            gc.set_threshold(*threshold)
            assert torch.equal(stored[off], before[off])
            assert not torch.equal(stored[~off], before[~off])
    finally:
        gc.set_threshold(*threshold)
    assert _optim.held_count() == 0


# -- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_steps_never_leaves_a_silent_or_partial_move() -> None:
    # A real SIGINT at a random moment of AdamW steps over many masked convs. After each
    # interrupt, either every value under a mask is where it was before the step, or the next
    # step reports exactly the layers whose values moved; values are never written back later.
    script = textwrap.dedent(
        """
        import os, random, signal, threading, time, warnings
        import torch
        from torch import nn
        from maskparam import _optim, apply_mask, masks

        random.seed(0)
        torch.manual_seed(0)
        plus = masks.cross(3, ndim=2)
        layers = [apply_mask(nn.Conv2d(4, 4, 3), plus) for _ in range(60)]
        params = [p for layer in layers for p in layer.parameters()]
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.5)
        for p in params:
            p.grad = torch.randn_like(p)

        def hidden():
            return [l.parametrizations.weight.original[:, :, ~plus].clone() for l in layers]

        interrupts = reported = 0
        for round in range(80):
            before = hidden()
            timer = threading.Timer(random.uniform(0, 0.01),
                                    lambda: os.kill(os.getpid(), signal.SIGINT))
            try:
                timer.start()
                for _ in range(20):
                    opt.step()
                timer.join()
                time.sleep(0.05)
            except KeyboardInterrupt:
                interrupts += 1
            timer.join()
            moved = sum(not torch.equal(a, b) for a, b in zip(before, hidden()))
            if _optim.held_count() == 0:
                assert moved == 0, f"{moved} layers moved with no hold left"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                now = hidden()
                opt.step()
            texts = [str(w.message) for w in caught]
            if moved:
                reported += 1
                named = f"({moved} layers)" if moved > 1 else "Conv2d.weight."
                assert len(texts) == 1 and named in texts[0], (moved, texts)
            else:
                assert not texts, texts
            assert all(torch.equal(a, b) for a, b in zip(now, hidden())), "stale write"
        print("interrupts", interrupts, reported)
        """
    )
    words = run_python(script)
    interrupts = int(words[-2])
    assert interrupts > 40  # the signals really landed inside the steps


# -- chains with more than one parametrization, and tensors that change under a hold -----------


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_masks_that_lead_a_chain_are_held_together_and_what_follows_is_not_a_mask() -> None:
    conv = _conv()
    eye = torch.eye(3, dtype=torch.bool)
    parametrize.register_parametrization(conv, "weight", FixedMask(eye))  # a second mask
    parametrize.register_parametrization(conv, "weight", _Double())  # then something else
    parametrize.register_parametrization(conv, "bias", _Double())  # a chain with no mask
    stored = conv.parametrizations.weight.original
    before = stored.detach().clone()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    opt.step()
    keep = PLUS & eye
    assert torch.equal(stored[:, :, ~keep], before[:, :, ~keep])
    assert not torch.equal(stored[:, :, keep], before[:, :, keep])


def test_no_masked_module_alive_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = _conv()
    monkeypatch.setattr(_optim, "_tracked", {})
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, weight_decay=0.5)
    _backward(conv)
    opt.step()  # as if no module were masked: weight decay moves every entry
    assert _optim.held_count() == 0


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_failed_step_whose_tensor_changed_since_is_reported_not_written(change: str) -> None:
    conv = _conv()
    stored = conv.parametrizations.weight.original
    opt = torch.optim.SGD([stored], lr=0.1, weight_decay=0.5)
    _backward(conv)
    _fail_step(opt)
    new = torch.zeros(3, 2, 5, 5) if change == "shape" else stored.detach().double()
    stored.data = new.clone()
    opt.param_groups[0]["params"] = []  # nothing to step: only the stale hold is looked at
    with pytest.warns(RuntimeWarning, match="did not finish"):
        opt.step()
    assert stored.dtype == new.dtype
    assert torch.equal(stored.detach(), new)  # nothing written into the new tensor
    assert _optim.held_count() == 0
