"""Any sequence of steps, failed steps, loads, mask changes, bakes and unmasks: no stale write.

A hypothesis state machine trains one conv with one SGD optimizer that lives through every
call: masking, ``set_mask``, baking, unmasking and masking again keep the same ``Parameter``
objects. Steps run eagerly or through ``torch.compile(opt.step)``; some raise, after moving
the weights or before. The machine computes each step's result itself (SGD without momentum
is one formula), so after every rule the stored weight must be bitwise what it computed:
trained where a tap is active, still where it is masked, and never set back to values held
by a step that failed.
"""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

from maskparam import apply_mask, is_masked, remove_mask, set_mask
from tests.strategies import kernel_masks_3x3

LR, DECAY = 0.125, 0.25


class Training(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, dtype=torch.float64)
        self.weight = self.conv.weight  # the same Parameter, masked or not
        self.opt = torch.optim.SGD(
            self.conv.parameters(), lr=LR, weight_decay=DECAY, foreach=False
        )
        self.compiled = torch.compile(self.opt.step, backend="eager")
        self.mask = torch.ones(3, 3, dtype=torch.bool)
        self.expected = self.weight.detach().clone()
        self.seed = 0

    def _backward(self) -> None:
        self.opt.zero_grad()
        self.seed += 1
        x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(self.seed))
        self.conv(x.double()).square().mean().backward()

    def _step(self, step: object) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a failed step's report
            step()  # type: ignore[operator]

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: not is_masked(self.conv))
    @rule(mask=kernel_masks_3x3)
    def mask_it(self, mask: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # every tap off
            apply_mask(self.conv, mask)
        self.mask = mask

    @precondition(lambda self: is_masked(self.conv))
    @rule(mask=kernel_masks_3x3)
    def change_mask(self, mask: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_mask(self.conv, mask)
        self.mask = mask

    @precondition(lambda self: is_masked(self.conv))
    @rule(bake=st.booleans())
    def unmask(self, bake: bool) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            remove_mask(self.conv, bake=bake)
        if bake:
            self.expected = torch.where(self.mask, self.expected, 0)
        self.mask = torch.ones(3, 3, dtype=torch.bool)

    @rule(seed=st.integers(0, 2**16))
    def load(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.conv.load_state_dict({"weight": weight, "bias": torch.zeros(3)})
        self.expected = weight

    @rule(compiled=st.booleans())
    def step(self, compiled: bool) -> None:
        self._backward()
        before = self.weight.detach().clone()
        grad = self.weight.grad.detach().clone()  # zero under the mask
        trained = before.add(grad.add(before, alpha=DECAY), alpha=-LR)
        self._step(self.compiled if compiled else self.opt.step)
        self.expected = torch.where(self.mask, trained, before)

    @rule(moves=st.booleans())
    def failed_step(self, moves: bool) -> None:
        self._backward()
        weight = self.weight

        def fail(*args: object) -> None:
            if moves:
                with torch.no_grad():
                    weight.mul_(0.5)
            raise RuntimeError("bad batch")

        handle = self.opt.register_step_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="bad batch"):
                self._step(self.opt.step)
        finally:
            handle.remove()
        self.expected = weight.detach().clone()  # what the failure left is what it is

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def stored_weight_is_exactly_as_computed(self) -> None:
        stored = self.weight.detach()
        assert torch.equal(stored.view(torch.uint8), self.expected.view(torch.uint8))

    @invariant()
    def masked_taps_are_zero(self) -> None:
        if is_masked(self.conv):
            assert (self.conv.weight[:, :, ~self.mask] == 0).all()


Training.TestCase.settings = settings(max_examples=10, stateful_step_count=12, deadline=None)
TestTraining = Training.TestCase


class LongTraining(Training):
    pass


LongTraining.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
TestLongTraining = pytest.mark.slow(LongTraining.TestCase)
