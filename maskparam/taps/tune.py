"""Tune the tap kernel on the CPU it runs on: timed once per CPU, at its first use, then cached.

A few choices in the kernel (``tapconv.c``) are worth one setting on one CPU and another on
the next: whether a large output is stored around the caches (``stream``), how many vectors
of output channels a channels-last tile holds (``tile``: wide and short, or narrow and
tall), and how many floats a rectangle of the channels-last weight gradient takes
(``chunk``: L1 or L2). :func:`settings` picks each by timing its candidates on a small conv,
one choice after another, in a few hundredths of a second, as FFTW plans or Triton autotunes.
Every candidate computes the same sums (the tests check it), so a choice changes only speed.

The choices are kept in the cache folder of the compiled kernel (see
:mod:`maskparam.taps.build`), in a file named after the instruction set and the kernel's
build, which records the CPU's model: a new kernel, or another CPU model, times again (and
replaces the file). ``MASKPARAM_TAP_TUNE=0`` (or ``false``,
``no``, ``off``) uses the kernel's defaults, and ``kernel_status()`` says which applies.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from maskparam.taps import build
from maskparam.taps import kernel as tap_kernel

__all__ = [
    "Tuning", "candidates", "clear", "cpu_model", "defaults", "settings", "time_choices", "using",
]  # fmt: skip

_OFF = ("0", "false", "no", "off")

STREAM_ON, STREAM_OFF = 0, -1
"""``stream``: 0 streams a large output's stores around the caches, -1 never does."""

CHUNKS = (1 << 12, 1 << 13, 1 << 15)
"""``chunk`` candidates, in floats: 16 KB and 32 KB, which stay in L1, and 128 KB, in L2."""


@dataclass(frozen=True)
class Tuning:
    """The kernel's choices on one CPU, and where they came from (``source``)."""

    stream: int
    tile: int
    chunk: int
    source: str

    def as_call(self) -> tuple[int, int, int]:
        """As ``tap_call`` takes them: (stream, tile, chunk)."""
        return (self.stream, self.tile, self.chunk)

    def __str__(self) -> str:
        stream = "off" if self.stream == STREAM_OFF else "on"
        if tap_kernel.library() is not None and not tap_kernel.sizes()["streams"]:
            stream = "n/a"  # a build that never streams
        return f"tile {self.tile}, chunk {self.chunk}, stream {stream} ({self.source})"


def candidates() -> dict[str, tuple[int, ...]]:
    """Per choice, the values the loaded kernel takes, its default first."""
    sizes = tap_kernel.sizes()
    tiles = range(1, sizes["tile_max"] + 1)
    default_tile, default_chunk = sizes["tile_default"], sizes["chunk_default"]
    return {
        # a build that never streams (AVX2, NEON) has nothing to choose there
        "stream": (STREAM_ON, STREAM_OFF) if sizes["streams"] else (STREAM_ON,),
        "tile": (default_tile, *(t for t in tiles if t != default_tile)),
        "chunk": (default_chunk, *(c for c in CHUNKS if c != default_chunk)),
    }


def defaults(source: str) -> Tuning:
    """The kernel's own choices."""
    first = {name: values[0] for name, values in candidates().items()}
    return Tuning(**first, source=source)


def cpu_model() -> str:
    """The CPU's model, as ``/proc/cpuinfo`` names it (or the platform's word for it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "CPU part")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# -- timing ----------------------------------------------------------------------------------


def _cross_taps() -> tuple[torch.Tensor, torch.Tensor]:
    taps = ((0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1))
    return tap_kernel.tap_table(taps, (3, 3, 3), (1, 1, 1), (1, 1, 1))


def _problems() -> dict[str, Callable[[tuple[int, int, int]], object]]:
    """Per choice, one call of the kernel that the choice bears on, with given tuning."""
    offsets, index = _cross_taps()
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape: int, cl: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=gen)
        return t.contiguous(memory_format=torch.channels_last_3d) if cl else t

    # stream: a contiguous forward whose output passes the kernel's threshold per thread
    threads = max(1, torch.get_num_threads())
    depth = 32 * threads
    x_s, w_s = tensor(1, 8, depth, 32, 32), tensor(32, 8, 3, 3, 3)
    # tile: a channels-last forward with 64 output channels (4 vectors on AVX-512)
    x_t, w_t = tensor(1, 32, 16, 16, 16, cl=True), tensor(64, 32, 3, 3, 3)
    # chunk: a channels-last weight gradient
    x_c, w_c = tensor(1, 16, 16, 16, 16, cl=True), tensor(32, 16, 3, 3, 3)
    g_c = tensor(1, 32, 16, 16, 16, cl=True)
    return {
        "stream": lambda t: tap_kernel.conv(x_s, w_s, None, offsets, index, (depth, 32, 32), t),
        "tile": lambda t: tap_kernel.conv(x_t, w_t, None, offsets, index, (16, 16, 16), t),
        "chunk": lambda t: tap_kernel.conv_backward(
            g_c, x_c, w_c, offsets, index, (False, True, False), t
        ),
    }


def _with(tuning: Tuning, name: str, value: int) -> Tuning:
    """``tuning`` with the choice ``name`` set to ``value``."""
    changes: dict[str, Any] = {name: value}
    return replace(tuning, **changes)


def time_choices(rounds: int = 5) -> Tuning:
    """Time each choice's candidates, one choice after another, the others as chosen so far.

    Each round runs every candidate once, in a rotating order; a candidate replaces the
    default only if its median time is at most 97% of the default's, so that noise does not
    move a choice.
    """
    options = candidates()
    best = defaults("timed on this CPU, " + cpu_model())
    problems = _problems()
    with torch.no_grad():
        for name, values in options.items():
            if len(values) < 2:
                continue
            run = problems[name]
            times: dict[int, list[float]] = {v: [] for v in values}
            for value in values:  # warm up: the first call of each allocates and faults
                run(_with(best, name, value).as_call())
            for r in range(rounds):
                order = values[r % len(values) :] + values[: r % len(values)]
                for value in order:
                    tune = _with(best, name, value).as_call()
                    start = time.perf_counter()
                    run(tune)
                    times[value].append(time.perf_counter() - start)
            median = {v: statistics.median(ts) for v, ts in times.items()}
            fastest = min(values, key=median.__getitem__)
            if median[fastest] <= 0.97 * median[values[0]]:
                best = _with(best, name, fastest)
    return best


# -- the cache -------------------------------------------------------------------------------

_lock = threading.Lock()
_settings: Tuning | None = None


def _cache_file() -> Path:
    key = tap_kernel.PLUGIN.target().key
    return build.cache_dir() / f"tune-{tap_kernel.isa()}-{key:016x}.json"


def _read(path: Path) -> Tuning | None:
    """The choices cached for this CPU, or None.

    A file for another CPU, or with any value the kernel does not take, is not used.
    """
    try:
        if build.untrusted_file(path) is not None:  # another user's, or a link
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    options = candidates()
    if not isinstance(data, dict) or data.get("cpu") != cpu_model():
        return None
    if any(data.get(name) not in values for name, values in options.items()):
        return None
    chosen = {name: int(data[name]) for name in options}
    return Tuning(**chosen, source=f"cached for this CPU, {cpu_model()}")


def _write(path: Path, tuning: Tuning) -> None:
    """Keep the choices for the next process, in the kernel's cache folder if it is private.

    Where it is not, or cannot be written, the next process times again.
    """
    data = {"cpu": cpu_model(), "stream": tuning.stream, "tile": tuning.tile}
    data["chunk"] = tuning.chunk
    if build.private_folder(path.parent) is not None:  # a folder maskparam does not trust
        return
    try:
        # a new file of a name no one can guess, then renamed over the old one: atomic
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            tmp.write(json.dumps(data))
        os.replace(tmp.name, path)
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(tmp.name)


def settings() -> Tuning:
    """The kernel's choices on this CPU: cached, else timed now (once per process at most).

    With ``MASKPARAM_TAP_TUNE=0`` (or ``false``, ``no``, ``off``), the kernel's defaults.
    Call only where the kernel is loaded (``maskparam.taps.kernel.library()``).
    """
    global _settings
    if _settings is not None:
        return _settings
    with _lock:
        if _settings is None:
            if os.environ.get("MASKPARAM_TAP_TUNE", "").strip().lower() in _OFF:
                _settings = defaults("defaults: MASKPARAM_TAP_TUNE turns tuning off")
            else:
                path = _cache_file()
                found = _read(path)
                if found is None:
                    found = time_choices()
                    _write(path, found)
                _settings = found
    return _settings


def clear() -> None:
    """Forget this process's choices: the next call reads the cache (or times) again."""
    global _settings
    with _lock:
        _settings = None


class _Tuner:
    """This module as :data:`maskparam.taps.kernel.TUNERS` holds it."""

    settings = staticmethod(settings)
    clear = staticmethod(clear)


tap_kernel.TUNERS[:] = [_Tuner()]


@contextlib.contextmanager
def using(tuning: Tuning) -> Iterator[None]:
    """Run the kernel with ``tuning`` inside the block (tests compare the variants this way)."""
    global _settings
    with _lock:
        before, _settings = _settings, tuning
    try:
        yield
    finally:
        with _lock:
            _settings = before
