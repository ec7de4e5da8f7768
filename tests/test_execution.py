"""What apply_mask records: it composes with the rest, falls back, and says why."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _forward, checkpoint, taps
from maskparam.apply import apply_mask, remove_mask, set_mask
from maskparam.taps import TapExecution
from tests.tap_helpers import (
    FALLBACK,
    PLUS,
    assert_same,
    causal_type_a,
    cross3d,
    kernel_off,
    run,
    twins,
)

# -- the recorded execution composes with the rest --------------------------------------------


def test_smoke() -> None:
    conv = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="taps")
    execution = conv.__dict__[_forward.EXECUTION_ATTR]
    assert isinstance(execution, TapExecution)
    assert [b.size for b in execution.boxes] == [3, 2, 2]
    assert repr(execution) == "TapExecution(mode='taps', active=7/27, boxes=3)"
    assert "_conv_forward" in type(conv).__dict__
    assert conv(torch.randn(1, 2, 4, 4, 4)).shape == (1, 3, 4, 4, 4)


def test_dense_records_nothing() -> None:
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS, execution="dense")
    assert _forward.EXECUTION_ATTR not in conv.__dict__
    assert "_conv_forward" not in type(conv).__dict__


def test_state_dict_roundtrip() -> None:
    dense, tapped = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "taps")
    assert tapped.state_dict().keys() == dense.state_dict().keys()
    fresh = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="taps")
    fresh.load_state_dict(dense.state_dict())
    x = torch.randn(1, 2, 4, 5, 6)
    torch.testing.assert_close(fresh(x), dense(x))


def test_load_state_dict_with_another_mask_decomposes_it() -> None:
    source = apply_mask(nn.Conv2d(2, 3, 7, padding=3), causal_type_a())
    target = apply_mask(nn.Conv2d(2, 3, 7, padding=3), torch.ones(7, 7), execution="taps")
    x = torch.randn(1, 2, 9, 9)
    target(x)  # plans the full kernel, and checks the mask tensor
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x))
    assert [b.size for b in target.__dict__[_forward.EXECUTION_ATTR].boxes] == [21, 3]


def test_in_place_mask_edit_is_decomposed() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS, execution="taps")
    x = torch.randn(1, 2, 6, 6)
    conv(x)
    with torch.no_grad():
        conv.parametrizations.weight[0].mask[0, 0] = True
    reference = apply_mask(copy.deepcopy(remove_mask(copy.deepcopy(conv), bake=False)), PLUS)
    set_mask(reference, conv.parametrizations.weight[0].mask)
    torch.testing.assert_close(conv(x), reference(x))
    assert sum(b.size for b in conv.__dict__[_forward.EXECUTION_ATTR].boxes) == 6


def test_set_mask_decomposes_the_new_mask() -> None:
    dense, tapped = twins(nn.Conv2d(2, 3, 7, padding=3), PLUS.new_ones(7, 7), "taps")
    set_mask(tapped, causal_type_a())
    set_mask(dense, causal_type_a())
    execution = tapped.__dict__[_forward.EXECUTION_ATTR]
    assert [b.size for b in execution.boxes] == [21, 3]
    x = torch.randn(2, 2, 8, 8)
    assert_same(run(dense, x), run(tapped, x), rtol=1e-5, atol=1e-5)


def test_set_mask_to_a_fragmented_mask_warns_where_the_kernel_cannot_take_it() -> None:
    # float64: the tap kernel, which can run any set of taps, takes float32 only.
    conv = apply_mask(nn.Conv3d(1, 1, 7).double(), torch.ones(7, 7, 7), execution="taps")
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    with pytest.warns(UserWarning, match=f"more than {taps.MAX_BOXES} boxes"):
        set_mask(conv, mask)
    assert conv.__dict__[_forward.EXECUTION_ATTR].boxes is None


def test_deepcopy() -> None:
    conv = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="auto")
    x = torch.randn(1, 2, 4, 4, 4)
    conv(x)
    twin = copy.deepcopy(conv)
    assert twin.__dict__[_forward.EXECUTION_ATTR] is not conv.__dict__[_forward.EXECUTION_ATTR]
    assert twin.__dict__[_forward.EXECUTION_ATTR].mode == "auto"
    torch.testing.assert_close(twin(x), conv(x))
    remove_mask(twin)
    assert "_conv_forward" in type(conv).__dict__
    torch.testing.assert_close(conv(x), twin(x))


def test_torch_save_keeps_execution() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 7, padding=3), causal_type_a(), execution="taps")
    x = torch.randn(1, 2, 8, 8)
    conv(x)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert (
        loaded.__dict__[_forward.EXECUTION_ATTR].boxes
        == conv.__dict__[_forward.EXECUTION_ATTR].boxes
    )
    torch.testing.assert_close(loaded(x), conv(x))


@pytest.mark.parametrize("bake", [True, False])
def test_remove_mask_gives_a_plain_dense_layer(bake: bool) -> None:
    dense, tapped = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "taps")
    x = torch.randn(1, 2, 4, 4, 4)
    expected = dense(x)
    remove_mask(tapped, bake=bake)
    assert type(tapped) is nn.Conv3d
    assert _forward.EXECUTION_ATTR not in tapped.__dict__
    assert not tapped._load_state_dict_post_hooks
    if bake:
        torch.testing.assert_close(tapped(x), expected)


def test_torch_compile_fullgraph() -> None:
    _, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    x = torch.randn(2, 2, 6, 6)
    eager = run(tapped, x)
    compiled = torch.compile(tapped, fullgraph=True, backend="aot_eager")
    assert_same(eager, run(compiled, x), rtol=1e-5, atol=1e-5)


def test_torch_compile_sees_a_new_mask_from_set_mask_or_load_state_dict() -> None:
    dense, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    compiled = torch.compile(tapped, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(compiled(x), dense(x))
    corners = ~PLUS
    for layer in (dense, tapped):
        set_mask(layer, corners)
    torch.testing.assert_close(compiled(x), dense(x))
    source = apply_mask(nn.Conv2d(2, 3, 3, padding=1), torch.ones(3, 3))
    for layer in (dense, tapped):
        layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(compiled(x), dense(x))


# -- fallbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", [nn.Linear(3, 3), nn.ConvTranspose2d(2, 2, 3)], ids=["Linear", "ConvTranspose2d"]
)
def test_forced_taps_on_unsupported_module_warns_and_runs_dense(module: nn.Module) -> None:
    mask = torch.ones(module.weight.shape, dtype=torch.bool)
    with pytest.warns(UserWarning, match=f"{FALLBACK} for this {type(module).__name__}"):
        apply_mask(module, mask, execution="taps")
    assert _forward.EXECUTION_ATTR not in module.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_mask(copy.deepcopy(remove_mask(module)), mask, execution="auto")  # silent


def test_forced_taps_with_data_dependent_bias_warns() -> None:
    with pytest.warns(UserWarning, match="bias_mode='valid' runs its own convolutions"):
        conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS, bias_mode="valid", execution="taps")
    assert _forward.EXECUTION_ATTR not in conv.__dict__


def test_forced_taps_on_fragmented_mask_warns_and_matches_dense() -> None:
    # As on a machine without the tap kernel, the only path that runs any set of taps.
    mask = torch.rand(7, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    layer = nn.Conv3d(1, 2, 7, padding=3)
    dense = apply_mask(copy.deepcopy(layer), mask)
    with kernel_off():
        with pytest.warns(UserWarning, match=f"more than {taps.MAX_BOXES} boxes"):
            tapped = apply_mask(layer, mask, execution="taps")
        x = torch.randn(1, 1, 8, 8, 8)
        with pytest.warns(UserWarning, match=FALLBACK):
            assert_same(run(dense, x), run(tapped, x))


def test_forced_taps_on_empty_mask_warns() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        conv = apply_mask(nn.Conv2d(1, 2, 3), torch.zeros(3, 3), execution="taps")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "all zero" in messages[0]
    assert "no active tap" in messages[1]
    with pytest.warns(UserWarning, match="no active tap"):
        out = conv(torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(out, conv.bias.detach().view(1, 2, 1, 1).expand(1, 2, 2, 2))


def test_forced_taps_after_another_parametrization_warns() -> None:
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w + 1  # makes masked taps non-zero

    dense, tapped = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "taps")
    for layer in (dense, tapped):
        parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match="another parametrization comes after the mask"):
        out = tapped(x)
    torch.testing.assert_close(out, dense(x))


def test_forced_taps_on_unsupported_device_or_dtype_warns() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3).to("meta"), PLUS, execution="taps")
    with pytest.warns(UserWarning, match="runs on CPU and CUDA, not meta"):
        assert conv(torch.empty(1, 2, 5, 5, device="meta")).shape == (1, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: complex modules are new
        layer = nn.Conv2d(2, 3, 3).to(torch.complex64)
    dense, tapped = twins(layer, PLUS, "taps")
    x = torch.randn(1, 2, 5, 5, dtype=torch.complex64)
    with pytest.warns(UserWarning, match="needs floating-point input"):
        torch.testing.assert_close(tapped(x), dense(x))


def test_forced_taps_under_vmap_warns_and_matches_dense() -> None:
    dense, tapped = twins(nn.Conv2d(3, 4, 3, padding=1), PLUS, "taps")
    x = torch.randn(5, 2, 3, 6, 6)
    with pytest.warns(UserWarning, match="torch.func transforms"):
        out = torch.func.vmap(tapped)(x)
    torch.testing.assert_close(out, torch.func.vmap(dense)(x))


def test_auto_falls_back_silently() -> None:
    conv = apply_mask(nn.Conv2d(2, 3, 3).to("meta"), PLUS, execution="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv(torch.empty(1, 2, 5, 5, device="meta"))


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["fast", "TAPS", None, 1])
def test_exception_unknown_execution(execution: object) -> None:
    conv = nn.Conv2d(1, 1, 3)
    before = copy.deepcopy(conv.state_dict())
    with pytest.raises(ValueError, match="execution to be one of"):
        apply_mask(conv, PLUS, execution=execution)  # type: ignore[arg-type]
    assert type(conv) is nn.Conv2d
    assert not parametrize.is_parametrized(conv)
    assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())


def test_exception_execution_on_other_names() -> None:
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match="needs name='weight'"):
        apply_mask(conv, torch.tensor([1, 0]), name="bias", execution="taps")
    assert not parametrize.is_parametrized(conv)


def test_an_execution_pickled_before_the_kernel_loads() -> None:
    execution = taps.TapExecution("taps", torch.rand(7, 7, 7, generator=torch.Generator()) < 0.3)
    state = execution.__getstate__()
    del state["tap_boxes"]  # as maskparam 0.1.0 pickled it
    old = taps.TapExecution.__new__(taps.TapExecution)
    old.__setstate__(state)
    assert old.tap_boxes == execution.tap_boxes
    assert old.boxes == execution.boxes


# -- torch.load(weights_only=True) of a whole model ---------------------------------------------


@pytest.mark.parametrize("execution", ["taps", "auto"])
@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel", "valid", "partial"])
def test_whole_model_loads_with_weights_only(execution: str, bias_mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # taps with a data bias mode runs dense
        model = nn.Sequential(
            apply_mask(
                nn.Conv2d(2, 3, 3, padding=1), PLUS, execution=execution, bias_mode=bias_mode
            ),  # type: ignore[arg-type]
            nn.ReLU(),
        )
    x = torch.randn(1, 2, 6, 6)
    model(x)  # "auto" records a choice: its keys hold a dtype and a device
    buffer = io.BytesIO()
    torch.save(model, buffer)
    # The documented list, which must hold every name the taps pickle.
    allowed = [*checkpoint.SAFE_GLOBALS, nn.Sequential, nn.Conv2d, nn.ReLU]
    buffer.seek(0)
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(loaded(x), model(x))
    buffer.seek(0)
    without = [g for g in allowed if g not in taps.SAFE_GLOBALS]
    if bias_mode not in ("valid", "partial"):  # these record no execution
        with (
            torch.serialization.safe_globals(without),
            pytest.raises(Exception, match="Unsupported global"),
        ):
            torch.load(buffer, weights_only=True)


def test_pickles_name_the_public_module() -> None:
    # As maskparam 0.1.0 did, so that moving code inside maskparam/taps breaks no file.
    for obj in taps.SAFE_GLOBALS:
        assert obj.__module__ == "maskparam.taps"
        assert getattr(taps, obj.__name__) is obj
