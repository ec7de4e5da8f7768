"""Tuning the tap kernel: timed once per CPU, cached, switched off by the environment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskparam.taps import kernel as tap_kernel
from maskparam.taps import tune
from tests.tap_helpers import needs_kernel

pytestmark = needs_kernel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache file of its own, and no choices made yet in this process."""
    path = tmp_path / "tune.json"
    monkeypatch.setattr(tune, "_cache_file", lambda: path)
    monkeypatch.delenv("MASKPARAM_TAP_TUNE", raising=False)
    tune.clear()
    yield path
    tune.clear()


def test_choices_are_timed_once_then_read_from_the_cache(cache: Path) -> None:
    timed = tune.settings()
    assert timed.source == f"timed on this CPU, {tune.cpu_model()}"
    assert tune.settings() is timed  # once per process
    stored = json.loads(cache.read_text())
    assert stored == {
        "cpu": tune.cpu_model(),
        **dict(zip(("stream", "tile", "chunk"), timed.as_call(), strict=True)),
    }
    tune.clear()  # as a new process
    cached = tune.settings()
    assert cached.as_call() == timed.as_call()
    assert cached.source == f"cached for this CPU, {tune.cpu_model()}"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps([1, 2, 3]),
        json.dumps({"cpu": "another CPU", "stream": 0, "tile": 1, "chunk": 8192}),
        json.dumps({"cpu": "", "stream": 0, "tile": 99, "chunk": 8192}),  # cpu set below
        json.dumps({"cpu": "", "stream": 7, "tile": 1, "chunk": 8192}),
        json.dumps({"cpu": "", "stream": 0, "tile": 1}),
    ],
    ids=["garbage", "a list", "another CPU", "a tile it lacks", "a stream value", "missing"],
)
def test_a_cache_it_cannot_use_is_timed_again(cache: Path, content: str) -> None:
    cache.write_text(content.replace('"cpu": ""', f'"cpu": {json.dumps(tune.cpu_model())}'))
    assert tune.settings().source.startswith("timed on this CPU")
    assert json.loads(cache.read_text())["cpu"] == tune.cpu_model()  # and rewritten


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_tuning_off_uses_the_kernels_defaults(
    cache: Path, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MASKPARAM_TAP_TUNE", value)
    chosen = tune.settings()
    sizes = tap_kernel.sizes()
    assert chosen.as_call() == (tune.STREAM_ON, sizes["tile_default"], sizes["chunk_default"])
    assert "MASKPARAM_TAP_TUNE" in chosen.source
    assert not cache.exists()  # nothing timed, nothing kept


def test_kernel_status_names_the_choices(cache: Path) -> None:
    chosen = tune.settings()
    status = tap_kernel.kernel_status()
    assert status == f"ready ({tap_kernel.isa()}); tuned: {chosen}"
    assert f"tile {chosen.tile}, chunk {chosen.chunk}" in status


def test_candidates_start_with_the_default_and_are_what_the_kernel_takes() -> None:
    options = tune.candidates()
    sizes = tap_kernel.sizes()
    assert options["tile"][0] == sizes["tile_default"]
    assert sorted(options["tile"]) == list(range(1, sizes["tile_max"] + 1))
    assert options["chunk"][0] == sizes["chunk_default"]
    streams = (tune.STREAM_ON, tune.STREAM_OFF) if sizes["streams"] else (tune.STREAM_ON,)
    assert options["stream"] == streams


class FakeClock:
    """A clock that moves only when a timed call says so: timings with no noise."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def timed_problems(clock: FakeClock, cost: dict[str, dict[int, float]]):  # type: ignore[no-untyped-def]
    """Problems whose calls take ``cost[choice][value]`` seconds of ``clock`` (else 1 s)."""
    position = {"stream": 0, "tile": 1, "chunk": 2}

    def problems() -> dict[str, object]:
        def make(name: str):  # type: ignore[no-untyped-def]
            def call(tuning: tuple[int, int, int]) -> None:
                clock.now += cost.get(name, {}).get(tuning[position[name]], 1.0)

            return call

        return {name: make(name) for name in position}

    return problems


def time_with(cost: dict[str, dict[int, float]], monkeypatch: pytest.MonkeyPatch) -> tune.Tuning:
    clock = FakeClock()
    monkeypatch.setattr(tune, "time", clock)
    monkeypatch.setattr(tune, "_problems", timed_problems(clock, cost))
    return tune.time_choices(rounds=3)


def test_a_clearly_faster_candidate_replaces_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    options = tune.candidates()
    tile, chunk = options["tile"][-1], options["chunk"][-1]
    chosen = time_with({"tile": {tile: 0.5}, "chunk": {chunk: 0.96}}, monkeypatch)
    assert (chosen.tile, chosen.chunk) == (tile, chunk)
    assert chosen.stream == options["stream"][0]  # none faster: the default


def test_a_candidate_within_the_margin_leaves_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = tune.candidates()
    tile, chunk = options["tile"][-1], options["chunk"][-1]
    # 2% faster is within noise: the default stays
    chosen = time_with({"tile": {tile: 0.98}, "chunk": {chunk: 0.98}}, monkeypatch)
    assert chosen.as_call() == tune.defaults("").as_call()


def test_using_sets_the_choices_for_a_block_then_restores_them(cache: Path) -> None:
    before = tune.settings()
    other = tune.Tuning(tune.STREAM_OFF, 1, tune.CHUNKS[0], source="a test")
    with tune.using(other):
        assert tap_kernel.tuning() == other.as_call()
    assert tune.settings() is before


def test_a_cache_file_others_may_write_or_a_link_is_not_read(cache: Path) -> None:
    good = {"cpu": tune.cpu_model(), "stream": 0, "tile": 1, "chunk": tune.CHUNKS[0]}
    cache.write_text(json.dumps(good))
    assert tune.settings().source.startswith("cached")
    tune.clear()
    cache.chmod(0o666)
    assert tune.settings().source.startswith("timed")  # and replaced by a private file
    assert cache.stat().st_mode & 0o077 == 0
    tune.clear()
    target = cache.with_name("elsewhere.json")
    target.write_text(json.dumps(good))
    cache.unlink()
    cache.symlink_to(target)
    assert tune.settings().source.startswith("timed")
    assert not cache.is_symlink()  # the link replaced, its target untouched
    assert json.loads(target.read_text()) == good


def test_choices_are_not_written_to_a_folder_others_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "tune.json"
    monkeypatch.setattr(tune, "_cache_file", lambda: path)
    monkeypatch.delenv("MASKPARAM_TAP_TUNE", raising=False)
    tune.clear()
    try:
        assert tune.settings().source.startswith("timed")
        assert list(shared.iterdir()) == []
    finally:
        tune.clear()
