"""execution="auto": timed once per kind of call by its layer, the fastest kept."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from maskparam import _forward, taps
from maskparam.apply import apply_mask
from maskparam.taps import TapExecution, choose
from maskparam.taps import auto as auto_module
from tests.tap_helpers import (
    PLUS,
    assert_same,
    causal_type_a,
    cross3d,
    run,
    twins,
)

# -- timing and the verdict -------------------------------------------------------------------


@pytest.fixture
def fake_timer(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, float]], list[object]]:
    """Replace the timing with fixed seconds per path; returns the list of calls made."""
    monkeypatch.setattr(auto_module, "_DECISIONS", {})

    def install(seconds: dict[str, float]) -> list[object]:
        calls: list[object] = []

        def measure(candidates: list[str], *args: object) -> dict[str, float]:
            calls.append((tuple(candidates), args[-1]))
            return {c: seconds[c] for c in candidates}

        monkeypatch.setattr(auto_module, "measure", measure)
        return calls

    return install


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ({"dense": 1.0, "dense_cl": 0.95, "taps": 0.5}, "taps"),
        ({"dense": 1.0, "dense_cl": 0.5, "taps": 0.6}, "dense_cl"),
        ({"dense": 1.0, "dense_cl": 0.95, "taps": 0.92}, "dense"),  # within the margin
        ({"dense": 1.0, "dense_cl": 2.0, "taps": 3.0}, "dense"),
    ],
)
def test_auto_picks_the_fastest_only_when_clearly_faster(
    fake_timer: Callable[[dict[str, float]], list[object]],
    seconds: dict[str, float],
    expected: str,
) -> None:
    calls = fake_timer(seconds)
    dense, auto = twins(nn.Conv3d(2, 3, 3, padding=1), cross3d(), "auto")
    x = torch.randn(1, 2, 4, 4, 4)
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)
    assert list(auto_module._DECISIONS.values()) == [expected]
    assert calls == [(("dense", "dense_cl", "taps"), True)]


def test_auto_measures_once_per_shape_and_grad_mode(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    calls = fake_timer({"dense": 1.0, "dense_cl": 1.0, "taps": 0.1})
    layers = [apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="auto") for _ in "ab"]
    x = torch.randn(1, 2, 4, 4, 4)
    for layer in layers:  # identical layers share the measurement
        layer(x)
        layer(x)
    layers[0](torch.randn(2, 2, 4, 4, 4))
    with torch.no_grad():
        layers[0](x)
    assert calls == [
        (("dense", "dense_cl", "taps"), True),
        (("dense", "dense_cl", "taps"), True),
        (("dense", "dense_cl", "taps"), False),
    ]


def test_auto_skips_taps_for_dense_masks(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    calls = fake_timer({"dense": 1.0, "dense_cl": 1.0})
    conv = apply_mask(nn.Conv1d(2, 3, 5), torch.tensor([1, 1, 1, 1, 0]), execution="auto")
    conv(torch.randn(1, 2, 9))
    assert calls == []  # 1-D has no channels-last layout, and 4/5 taps are too many
    assert list(auto_module._DECISIONS.values()) == ["dense"]


def test_auto_real_measurement_leaves_gradients_alone() -> None:
    dense, auto = twins(nn.Conv2d(2, 3, 7, padding=3), causal_type_a(), "auto")
    x = torch.randn(2, 2, 8, 8)
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)  # first call measures
    assert auto.__dict__[_forward.EXECUTION_ATTR]._choices
    assert_same(run(dense, x), run(auto, x), rtol=1e-5, atol=1e-5)


def test_auto_under_compile_uses_eager_choice(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    fake_timer({"dense": 1.0, "dense_cl": 1.0, "taps": 0.1})
    dense, auto = twins(nn.Conv2d(2, 3, 3, padding=1), PLUS, "auto")
    x = torch.randn(2, 2, 6, 6)
    run(auto, x)
    compiled = torch.compile(auto, fullgraph=True, backend="aot_eager")
    assert_same(run(dense, x), run(compiled, x), rtol=1e-5, atol=1e-5)


# -- explain reads the verdict, and times nothing ---------------------------------------------


def test_explain_runs_no_timing(
    fake_timer: Callable[[dict[str, float]], list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = apply_mask(nn.Conv2d(2, 3, 3, padding=1), PLUS, execution="auto")
    x = torch.randn(2, 2, 6, 6)

    def no_timing(*args: object) -> None:
        raise AssertionError("explain timed the candidates")

    with monkeypatch.context() as patch:
        patch.setattr(auto_module, "measure", no_timing)
        patch.setattr(TapExecution, "time", no_timing)
        before = taps.explain(layer, x)
    assert (before.path, before.rule) == ("dense", choose.AUTO_PENDING)
    assert not layer.__dict__[_forward.EXECUTION_ATTR]._choices  # nothing recorded either
    calls = fake_timer({"dense": 1.0, "dense_cl": 0.95, "taps": 0.5})
    layer(x)  # the layer's own call times, once
    assert len(calls) == 1
    with monkeypatch.context() as patch:
        patch.setattr(auto_module, "measure", no_timing)
        patch.setattr(TapExecution, "time", no_timing)
        after = taps.explain(layer, x)
    assert after.path in ("kernel", "fused")  # the recorded verdict: the taps
    layer(x)
    assert len(calls) == 1


def test_auto_times_again_for_another_thread_count(
    fake_timer: Callable[[dict[str, float]], list[object]],
) -> None:
    calls = fake_timer({"dense": 1.0, "dense_cl": 1.0, "taps": 0.1})
    layer = apply_mask(nn.Conv3d(2, 3, 3, padding=1), cross3d(), execution="auto")
    x = torch.randn(1, 2, 4, 4, 4)
    threads = torch.get_num_threads()
    layer(x)
    try:
        torch.set_num_threads(threads + 1)
        layer(x)
        layer(x)
    finally:
        torch.set_num_threads(threads)
    layer(x)
    assert len(calls) == 2
