"""Partial convs as layers: state_dict, copies, pickles, compile, trace, PartialSequential."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskparam import _forward, masks
from maskparam.apply import apply_mask, remove_mask, set_mask
from maskparam.partial import PartialSequential, partial_conv
from tests.partial_helpers import MODES, PLUS, TYPE_A, masked, reference

# -- apply / remove / set / copy / save / compile --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_roundtrip(mode: str) -> None:
    source = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    keep = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS)
    state = source.state_dict()
    assert state.keys() == keep.state_dict().keys()  # the mode is not in the state_dict
    target = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    target.load_state_dict(state)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    x = torch.randn(1, 2, 5, 5)
    before = conv(x)
    twin = copy.deepcopy(conv)
    assert twin.__dict__[_forward.BIAS_MODE_ATTR] == mode
    assert torch.equal(twin(x), before)
    set_mask(twin, TYPE_A)
    assert torch.equal(conv(x), before)
    torch.testing.assert_close(twin(x), reference(twin, x, None, mode)[0])


@pytest.mark.parametrize("mode", MODES)
def test_torch_save_roundtrip(mode: str) -> None:
    model = nn.Sequential(masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode), nn.ReLU())
    x = torch.randn(1, 2, 5, 5)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[0].__dict__[_forward.BIAS_MODE_ATTR] == mode
    assert torch.equal(loaded(x), model(x))
    assert (loaded(x)[0, :, 0, 0] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_set_mask_changes_coverage(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    x = torch.randn(1, 2, 5, 5)
    conv(x)
    set_mask(conv, TYPE_A)
    fresh = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, mode)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), fresh(x))
    validity = torch.rand(1, 1, 5, 5) < 0.5
    assert torch.equal(partial_conv(conv, x, validity)[0], partial_conv(fresh, x, validity)[0])


@pytest.mark.parametrize("mode", MODES)
def test_remove_mask_refuses_to_bake(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    cls = type(conv)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot compute.*bake=False"):
        remove_mask(conv)
    assert type(conv) is cls
    assert conv.__dict__[_forward.BIAS_MODE_ATTR] == mode
    for key, value in conv.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("mode", MODES)
def test_remove_mask_without_baking_gives_a_plain_conv(mode: str) -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), PLUS, mode)
    original = conv.parametrizations.weight.original.detach().clone()
    remove_mask(conv, bake=False)
    assert type(conv) is nn.Conv2d
    assert _forward.BIAS_MODE_ATTR not in conv.__dict__
    assert torch.equal(conv.weight, original)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(conv(x), F.conv2d(x, original, conv.bias, padding=1))


@pytest.mark.slow  # inductor compiles C++
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compile_fullgraph() -> None:
    conv = masked(nn.Conv2d(2, 3, 3, padding=1), TYPE_A, "partial")
    twin = copy.deepcopy(conv)
    validity = torch.rand(2, 1, 6, 6) < 0.6

    def step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, valid = partial_conv(layer, x, validity)
        return (layer(x) + out).square().sum(), valid

    x = torch.randn(2, 2, 6, 6)
    loss, valid = torch.compile(step, fullgraph=True)(conv, x)
    loss.backward()
    loss_eager, valid_eager = step(twin, x)
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager)
    assert torch.equal(valid, valid_eager)
    torch.testing.assert_close(
        conv.parametrizations.weight.original.grad, twin.parametrizations.weight.original.grad
    )


# -- PartialSequential --------------------------------------------------------------------


def net() -> PartialSequential:
    return PartialSequential(
        masked(nn.Conv2d(1, 4, 3, padding=1), PLUS, "partial"),
        nn.ReLU(),
        PartialSequential(masked(nn.Conv2d(4, 4, 3, padding=1), PLUS, "valid")),
        nn.BatchNorm2d(4),
        masked(nn.Conv2d(4, 2, 3, padding=1), torch.ones(2, 1, 3, 3), "partial"),
    )


def test_partial_sequential_chains_partial_conv() -> None:
    model = net().eval()
    x = torch.randn(2, 1, 7, 7)
    validity = torch.rand(2, 1, 7, 7) < 0.2
    out, valid = model(x, validity)
    h, v = partial_conv(model[0], x, validity)
    h, v = partial_conv(model[2][0], model[1](h), v)
    h, v = partial_conv(model[4], model[3](h), v)
    assert torch.equal(out, h)
    assert torch.equal(valid, v)
    assert valid.shape == (2, 2, 7, 7)  # the last mask is per output channel
    # Holes shrink layer by layer but never grow.
    assert (valid >= validity).all()
    default_out, default_valid = model(x)
    assert default_valid.all()
    assert torch.equal(default_out, model[4](model[3](model[2][0](model[1](model[0](x))))))


def test_partial_sequential_state_dict_is_that_of_sequential() -> None:
    model = net()
    plain = nn.Sequential(*copy.deepcopy(list(model)))
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("bias_mode", ["valid", "partial"])
def test_jit_trace_records_the_validity_maps(bias_mode: str) -> None:
    conv = apply_mask(
        nn.Conv2d(1, 2, 3, padding=1), masks.causal(3, ndim=2, kind="A"), bias_mode=bias_mode
    )  # type: ignore[arg-type]
    x = torch.randn(1, 1, 8, 8)
    conv(x)  # eager caches the maps of this shape; the trace must not depend on that
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(conv, (x,))
    torch.testing.assert_close(traced(x), conv(x))
    torch.testing.assert_close(traced(2 * x), conv(2 * x))
