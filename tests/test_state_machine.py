"""Any sequence of mask calls, loads, assignments, conversions and steps loses nothing.

A hypothesis state machine drives one conv through apply / set_mask / load_state_dict
(plain and masked, strict or not, other dtypes, assign) / weight assignment / ``.to()`` /
``.half()`` / optimizer steps / remove (both bakes). It tracks what the stored values must be,
and checks after every step that the effective weight is exactly masked and that the values
under the mask are bitwise what they must be.
"""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

from maskparam import apply_mask, get_mask, remove_mask, set_mask
from tests.strategies import kernel_masks_3x3

SHAPE = (3, 2, 3, 3)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included (a float16 step may overflow an active entry)."""
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def _values(seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


class MaskedConv(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.masked = False
        self.mask = torch.ones(3, 3, dtype=torch.bool)
        self.stored = self.conv.weight.detach().clone()  # what the layer must store

    # -- helpers -----------------------------------------------------------------------

    def _original(self) -> torch.Tensor:
        if self.masked:
            return self.conv.parametrizations.weight.original.detach()
        return self.conv.weight.detach()

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: not self.masked)
    @rule(mask=kernel_masks_3x3, bias_mode=st.sampled_from(["keep", "zero", "channel"]))
    def apply(self, mask: torch.Tensor, bias_mode: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an all-zero mask warns; it is allowed
            apply_mask(self.conv, mask, bias_mode=bias_mode)  # type: ignore[arg-type]
        self.masked, self.mask = True, mask

    @precondition(lambda self: self.masked)
    @rule(mask=kernel_masks_3x3)
    def change_mask(self, mask: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_mask(self.conv, mask)
        self.mask = mask

    @precondition(lambda self: self.masked)
    @rule(
        masked_form=st.booleans(),
        mask=kernel_masks_3x3,
        strict=st.booleans(),
        assign=st.booleans(),
        dtype=dtypes,
        seed=seeds,
    )
    def load(
        self,
        masked_form: bool,
        mask: torch.Tensor,
        strict: bool,
        assign: bool,
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        values = _values(seed, dtype)
        bias = torch.randn(3).to(dtype)
        state: dict[str, torch.Tensor] = {"bias": bias}
        if masked_form:
            state["parametrizations.weight.original"] = values
            state["parametrizations.weight.0.mask"] = mask
            own = self.conv.state_dict()
            if "parametrizations.bias.original" in own:  # a bias held by bias_mode
                state["parametrizations.bias.original"] = state.pop("bias")
                state["parametrizations.bias.0.mask"] = own["parametrizations.bias.0.mask"]
        else:
            state["weight"] = values
        self.conv.load_state_dict(state, strict=strict, assign=assign)
        target = dtype if assign else self.stored.dtype
        self.stored = values.to(target)
        if masked_form:
            self.mask = mask

    @precondition(lambda self: self.masked)
    @rule(seed=seeds)
    def assign_weight(self, seed: int) -> None:
        values = _values(seed, self.stored.dtype)
        self.conv.weight = values
        self.stored = values.clone()
        values.fill_(123.0)  # the caller's tensor is not the layer's

    @rule(dtype=dtypes)
    def convert(self, dtype: torch.dtype) -> None:
        self.conv.to(dtype)
        self.stored = self.stored.to(dtype)

    @rule()
    def half(self) -> None:
        self.conv.half()
        self.stored = self.stored.half()

    @rule(weight_decay=st.sampled_from([0.0, 0.5]))
    def train(self, weight_decay: float) -> None:
        dtype = self.stored.dtype
        opt = torch.optim.AdamW(self.conv.parameters(), lr=0.1, weight_decay=weight_decay)
        x = torch.randn(1, 2, 4, 4).to(dtype)
        self.conv(x).float().square().mean().backward()
        opt.step()
        keep = self.mask.expand(SHAPE) if self.masked else torch.ones(SHAPE, dtype=torch.bool)
        # The active entries trained (their values are the optimizer's business).
        self.stored = torch.where(keep, self._original(), self.stored)

    @precondition(lambda self: self.masked)
    @rule(bake=st.booleans())
    def remove(self, bake: bool) -> None:
        remove_mask(self.conv, bake=bake)
        if bake:
            self.stored = torch.where(self.mask, self.stored, 0)
        self.masked = False
        self.mask = torch.ones(3, 3, dtype=torch.bool)
        assert type(self.conv) is nn.Conv2d
        assert [n for n, _ in self.conv.named_parameters()] == ["weight", "bias"]

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def stored_values_are_never_lost(self) -> None:
        original = self._original()
        assert _bitwise_equal(original, self.stored)

    @invariant()
    def weight_is_exactly_masked(self) -> None:
        if not self.masked:
            return
        assert torch.equal(get_mask(self.conv), self.mask)
        weight = self.conv.weight.detach()
        assert _bitwise_equal(weight, torch.where(self.mask, self.stored, 0))
        assert (weight[:, :, ~self.mask] == 0).all()


MaskedConv.TestCase.settings = settings(max_examples=60, stateful_step_count=12, deadline=None)
TestMaskedConv = MaskedConv.TestCase
