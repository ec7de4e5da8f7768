"""A masked model through torch.save of the whole model, torch.compile, torch.export and
parametrize.cached."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam.apply import apply_mask, get_mask, is_masked
from maskparam.checkpoint import SAFE_GLOBALS
from maskparam.model import apply_masks, remove_masks
from maskparam.parametrizations import FixedMask

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)


def build() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    )
    per_channel = torch.tensor([1, 1, 0, 1], dtype=torch.bool).reshape(4, 1, 1, 1)
    apply_masks(model, {"0": per_channel & PLUS, "2": PLUS})
    apply_mask(model[4], PLUS, bias_mode="zero")
    return model


def train(model: nn.Module, steps: int = 3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    target = torch.randn(2, 2, 5, 5, generator=gen)
    for _ in range(steps):
        loss = (model(torch.randn(2, 2, 5, 5, generator=gen)) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_masked_taps_zero(model: nn.Module) -> None:
    for layer in (model[0], model[2], model[4]):
        full = get_mask(layer).expand(layer.weight.shape)
        assert torch.all(layer.weight[~full] == 0)
    assert torch.all(model[4].bias == 0)


def roundtrip(obj: object, **load_kwargs: object) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, **load_kwargs)  # type: ignore[arg-type]
    return loaded


X = torch.randn(2, 2, 5, 5)


# -- whole-model torch.save / torch.load -------------------------------------------------------


def test_whole_model_save_train_load_train_unmask() -> None:
    model = build()
    train(model)
    assert model(X).count_nonzero() > 0
    loaded = roundtrip(model, weights_only=False)
    assert torch.equal(loaded(X), model(X))
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    for mine, theirs in zip(loaded, model, strict=True):
        before = parametrize.type_before_parametrizations
        assert before(mine) is before(theirs)
        if parametrize.is_parametrized(theirs):
            assert type(mine) is not type(theirs)  # a class of its own
    # The copy trains on its own and stays masked; the original does not move.
    train(loaded, seed=2)
    assert_masked_taps_zero(loaded)
    assert torch.equal(model(X), roundtrip(model, weights_only=False)(X))
    assert not torch.equal(loaded(X), model(X))
    # Unmasking the copy leaves plain layers and the original masked.
    expected_out = loaded(X)
    assert remove_masks(loaded) == ["0", "2", "4"]
    assert [type(m) for m in loaded] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert torch.equal(loaded(X), expected_out)
    assert all(is_masked(model[i]) for i in (0, 2, 4))
    assert_masked_taps_zero(model)


def test_whole_model_pickle_names_no_generated_class() -> None:
    data = pickle.dumps(build())
    assert b"ParametrizedConv2d" not in data
    assert type(pickle.loads(data)[0]).__name__ == "ParametrizedConv2d"


def test_whole_model_pickle_of_a_baked_model_has_no_maskparam_in_it() -> None:
    model = build()
    remove_masks(model)
    assert b"maskparam" not in pickle.dumps(model)


def test_whole_model_default_weights_only_refuses_and_names_the_alternatives() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"weights_only.*(?s:.*)safe_globals"):
        roundtrip(build())


def test_whole_model_weights_only_with_safe_globals() -> None:
    model = build()
    train(model)
    layers = [nn.Sequential, nn.Conv2d, nn.ReLU]
    with torch.serialization.safe_globals([*SAFE_GLOBALS, *layers]):
        loaded = roundtrip(model)
    assert torch.equal(loaded(X), model(X))
    assert isinstance(loaded[4].parametrizations.bias[0], FixedMask)


def test_state_dict_file_needs_nothing_extra() -> None:
    model = build()
    train(model)
    state = roundtrip(model.state_dict())  # the default, weights_only=True
    other = build()
    other.load_state_dict(state)  # type: ignore[arg-type]
    assert torch.equal(other(X), model(X))


# -- torch.compile -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_compile_fullgraph_outputs_and_gradients_match_eager(backend: str) -> None:
    eager, compiled_model = build(), build()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(2, 2, 5, 5)
    expected = eager(x)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    expected.square().sum().backward()
    out.square().sum().backward()
    grads = dict(compiled_model.named_parameters())
    for name, param in eager.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(grads[name].grad, param.grad)
    for i in (0, 2, 4):
        original = compiled_model[i].parametrizations.weight.original
        full = get_mask(compiled_model[i]).expand(original.shape)
        assert torch.all(original.grad[~full] == 0)  # exactly, not just close


def test_compile_trains_and_keeps_masks() -> None:
    model = build()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    train(compiled, steps=3)
    assert_masked_taps_zero(model)
    assert torch.equal(compiled(X), model(X))


# -- torch.export ------------------------------------------------------------------------------


def test_export_masked_and_baked() -> None:
    model = build()
    train(model)
    exported = torch.export.export(model, (X,))
    assert "aten.where" in exported.graph_module.code
    assert torch.equal(exported.module()(X), model(X))
    other = torch.randn(2, 2, 5, 5)
    assert torch.equal(exported.module()(other), model(other))

    baked = copy.deepcopy(model)
    remove_masks(baked)
    exported_baked = torch.export.export(baked, (X,))
    assert "aten.where" not in exported_baked.graph_module.code
    assert torch.equal(exported_baked.module()(X), model(X))


# -- parametrize.cached ------------------------------------------------------------------------


def test_cached_computes_each_masked_weight_once() -> None:
    model = build().eval()
    calls: list[int] = []
    for module in model.modules():
        if isinstance(module, FixedMask):
            module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        expected = model(X)
        assert len(calls) == 4  # three weights and one bias
        calls.clear()
        with parametrize.cached():
            first = model(X)
            second = model(X)
        assert len(calls) == 4
        assert torch.equal(first, expected)
        assert torch.equal(second, expected)
        # Leaving the cache drops it: a change to the weights shows again.
        model[0].parametrizations.weight.original.mul_(2)
        assert not torch.equal(model(X), expected)


def test_cached_keeps_copies_apart() -> None:
    model = build().eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].parametrizations.weight.original.mul_(-1)
        with parametrize.cached():
            assert not torch.equal(model(X), twin(X))
            assert not torch.equal(model[0].weight, twin[0].weight)


def test_a_wrapper_subclass_of_the_masked_class_still_copies_pickles_and_loads() -> None:
    # FSDP2's fully_shard re-classes a module as (FSDPModule, <its class>); so does this.
    class Wrapper:
        pass

    conv = apply_mask(nn.Conv2d(2, 2, 3), PLUS)
    conv.__class__ = type("WrappedConv2d", (Wrapper, type(conv)), {})
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(copy.deepcopy(conv)(x), conv(x))
    assert torch.equal(pickle.loads(pickle.dumps(conv))(x), conv(x))
    plain = nn.Conv2d(2, 2, 3)
    conv.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(conv.parametrizations.weight.original, plain.weight)
    assert torch.equal(get_mask(conv), PLUS)
