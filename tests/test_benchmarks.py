"""The benchmark script runs, and ``--json`` writes its raw results as valid JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("maskparam_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # for its dataclasses
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # bench.main sets it for the whole process


def test_json_holds_the_raw_results(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--threads", "1", "--sections", "1,2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "== 1. Parametrization overhead" in printed
    assert "== 2. Active taps" in printed

    results = json.loads(out.read_text())
    for key in ("command", "commit", "date", "machine", "torch", "threads", "tap_kernel"):
        assert key in results, key
    assert results["command"].endswith(f"--sections 1,2 --json {out}")
    assert results["torch"] == torch.__version__
    (overhead, taps) = results["sections"]["overhead"], results["sections"]["taps"]
    assert [r["pass"] for r in overhead] == ["fwd", "fwd+bwd"]
    assert set(overhead[0]["seconds"]) == {"plain", "masked", "cached", "prune"}
    (case,) = taps
    assert case["active"] == 7
    assert case["taps"] == 27
    assert {"dense", "taps", "auto"} <= set(case["seconds"])
    for variant, times in case["seconds"].items():
        assert len(times) == results["rounds"] == 1, variant
        assert all(t > 0 for t in times), variant

    # Section 2 also times the forward alone, and compares taps with the faster dense layout.
    assert {"dense", "dense_cl", "taps", "taps_cl", "best_dense"} <= set(case["forward_seconds"])
    for key in ("seconds", "forward_seconds"):
        times = case[key]
        best = [min(a, b) for a, b in zip(times["dense"], times["dense_cl"], strict=True)]
        assert times["best_dense"] == best, key
        for variant, per_round in times.items():
            assert len(per_round) == 1, (key, variant)
            assert all(t > 0 for t in per_round), (key, variant)
    section = printed[printed.index("== 2. Active taps") :]
    for column in ("taps/dense", "taps_cl/dense_cl", "taps/best", "taps_cl/best"):
        assert column in section, column
    passes = [
        line[len(case["case"]) :].split()[0]
        for line in section.splitlines()
        if line.startswith(case["case"])
    ]
    assert passes == ["fwd+bwd", "fwd"]


def test_best_dense_is_the_faster_dense_per_round(bench: ModuleType) -> None:
    times = {"dense": [2.0, 1.0, 3.0], "dense_cl": [1.5, 1.2, 3.0]}
    bench.add_best_dense(times)
    assert times["best_dense"] == [1.5, 1.0, 3.0]
    contiguous_only = {"dense": [2.0, 1.0]}  # no channels-last variant: 1-D cases, --brief
    bench.add_best_dense(contiguous_only)
    assert contiguous_only["best_dense"] == [2.0, 1.0]
