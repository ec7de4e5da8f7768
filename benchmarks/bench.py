"""maskparam benchmarks: the cost of a mask, active-tap execution, whole-model masking.

Run ``nox -s bench`` or ``python benchmarks/bench.py`` (``--help`` for the options). It
prints tables of time ratios. Every ratio is measured in this one process, with the variants
interleaved round by round (the order rotates each round), and is the median over the rounds
of the per-round ratio, with the 10th-90th percentile spread in brackets. Times are in
milliseconds, medians. CPU times use ``time.perf_counter``; on CUDA, CUDA events.

Sections:

1. Parametrization overhead: a masked layer (dense execution) against the plain layer with
   the same weights, forward (under ``no_grad``) and forward+backward, with and without
   ``torch.nn.utils.parametrize.cached()``, and ``torch.nn.utils.prune.custom_from_mask``.
2. Active-tap execution against dense masked execution, with input and gradient in the
   usual contiguous layout, and again in channels-last layout ("_cl"); "auto" too. Each case
   has two lines: "fwd+bwd" times forward+backward, "fwd" the forward alone under
   ``no_grad`` (dense, dense_cl, taps and taps_cl; auto reads n/a there). taps/dense and
   taps/dense_cl put taps with contiguous input against dense with either layout;
   taps_cl/dense_cl is both in channels-last. taps/best and taps_cl/best put taps, with
   contiguous and with channels-last input, against the best dense: the faster of contiguous
   and channels-last dense, per round (dense alone where there is no channels-last variant:
   1-D cases and ``--brief``).
   The first line says whether the compiled tap kernel runs here
   (``maskparam.taps.kernel_status()``); where it does not, taps runs the boxes.
   Peak memory is the most tensor memory held at once during one forward+backward, beyond
   the inputs (CUDA: the caching allocator's peak; CPU: the profiler's allocation events);
   it is measured for the fwd+bwd line only.
   The "random" cases have arbitrary tap sets (seeded), which the tap kernel takes as they
   are. The GF/s column is the useful work of taps (2 flops per active tap, input channel,
   output channel and output position, for the forward, input and weight gradients; on the
   "fwd" line for the forward alone, a third of that) per second, and "%peak" its fraction
   of this machine's FMA peak, measured by a small probe (independent FMA chains on every
   thread, built for the tap kernel's instruction set) that is timed among the variants, so
   that the fraction is a per-round ratio like the others.
3. ``apply_masks`` and baking (``remove_masks(bake=True)``) on a ResNet-50-sized network
   with 53 convolutions, against one forward pass of that network at batch 1.

``--json OUT`` also writes the raw results to ``OUT``: the command, commit, date, machine and
torch, and per case every variant's time in every round (seconds) beside the printed ratios.
In section 2, "seconds" holds the forward+backward times and "forward_seconds" the forward's;
"best_dense" in each is derived from the timed dense and dense_cl, round by round, not timed.

``--isa avx2`` measures as on a CPU with AVX2 but no AVX-512: it runs the tap kernel built for
AVX2 (``MASKPARAM_TAP_ISA=avx2``) and caps oneDNN, which runs dense, at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, read when torch loads: the script starts itself again with it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskparam.apply import apply_mask
from maskparam.model import apply_masks, remove_masks
from maskparam.taps import build as tap_build
from maskparam.taps import empty_cache, kernel_status
from maskparam.taps import kernel as tap_kernel

Fn = Callable[[], object]
Record = dict[str, object]


# -- masks ----------------------------------------------------------------------------------


def cross(k: int, ndim: int) -> Tensor:
    """The taps on the axes through the centre: 7 of 27 for a 3x3x3."""
    grids = torch.meshgrid(*[torch.arange(k) - k // 2] * ndim, indexing="ij")
    return sum((g == 0).int() for g in grids) >= ndim - 1


def ball(radius: int, ndim: int) -> Tensor:
    """The taps within ``radius`` of the centre: 33 of 125 for r=2 in 3-D."""
    grids = torch.meshgrid(*[torch.arange(-radius, radius + 1)] * ndim, indexing="ij")
    return sum(g**2 for g in grids) <= radius**2


def causal_type_a(k: int) -> Tensor:
    """PixelCNN mask A: the taps strictly before the centre in raster order (24 of 49)."""
    flat = torch.arange(k * k).reshape(k, k)
    return flat < (k * k) // 2


def random_taps(kernel: tuple[int, ...], active: int, seed: int) -> Tensor:
    """``active`` taps of ``kernel`` drawn at random (seeded): an arbitrary tap set."""
    order = torch.randperm(
        torch.Size(kernel).numel(), generator=torch.Generator().manual_seed(seed)
    )
    mask = torch.zeros(torch.Size(kernel).numel(), dtype=torch.bool)
    mask[order[:active]] = True
    return mask.reshape(kernel)


def spaced_1d(k: int, active: int) -> Tensor:
    """``active`` taps evenly spread over ``k``: 3 of 9 is taps 0, 4 and 8."""
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.linspace(0, k - 1, active).round().long()] = True
    return mask


# -- timing -----------------------------------------------------------------------------------


class Timer:
    """Seconds per call: ``perf_counter`` on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Fn) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def interleaved(
    fns: dict[str, Fn], rounds: int, timer: Timer, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per round of every variant; each round runs them all, in a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timer(fns[name]))
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """Median of the per-round ratios num/den, and its 10th-90th percentile spread."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return (
        f"{statistics.median(per_round):5.2f} "
        f"[{quantile(per_round, 0.1):.2f}-{quantile(per_round, 0.9):.2f}]"
    )


def ms(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]) * 1e3:8.1f}"


def add_best_dense(times: dict[str, list[float]]) -> None:
    """Add "best_dense" to ``times``: per round, the faster of "dense" and "dense_cl".

    Taken round by round, so that ratios against it are per-round ratios like the others.
    Without a "dense_cl" (1-D cases, ``--brief``) it is "dense".
    """
    other = times.get("dense_cl", times["dense"])
    times["best_dense"] = [min(a, b) for a, b in zip(times["dense"], other, strict=True)]


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Send what C++ code writes to stdout and stderr (the profiler's notices) nowhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def peak_bytes(fn: Fn, device: torch.device) -> int:
    """The most tensor memory held at once while ``fn`` runs, beyond what existed before."""
    fn()  # warm: first-call allocations are not the steady state
    # The taps path keeps its scratch buffers from call to call: empty them, so that the
    # measured call allocates, and counts, the ones it uses.
    empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with silenced(), tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            fn()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    # The most held at once of what the call allocates itself. Its "Total Allocated" would
    # also count blocks from earlier profiler runs, freed outside any, that never leave it.
    alive: dict[int, int] = {}
    held = peak = 0
    for event in memory:
        size, addr = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            alive[addr] = size
            held += size
        elif addr in alive:
            held -= alive.pop(addr)
        peak = max(peak, held)
    return peak


def fwd_bwd(layer: nn.Module, x: Tensor, grad: Tensor) -> Fn:
    x = x.detach().requires_grad_()

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def fwd(layer: nn.Module, x: Tensor) -> Fn:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def channels_last(t: Tensor) -> Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t if fmt is None else t.contiguous(memory_format=fmt)


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    ndim: int
    batch: int
    c_in: int
    c_out: int
    size: int
    mask: Tensor
    quick: bool = False

    def layer(self, device: torch.device, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.ndim]
        k = tuple(self.mask.shape)
        return conv(self.c_in, self.c_out, k, padding=tuple(s // 2 for s in k)).to(device)

    def input(self, device: torch.device) -> Tensor:
        gen = torch.Generator().manual_seed(1)
        shape = (self.batch, self.c_in) + (self.size,) * self.ndim
        return torch.randn(shape, generator=gen).to(device)

    def __str__(self) -> str:
        side = "x".join([str(self.size)] * self.ndim)
        return f"{self.name} ({self.batch}, {self.c_in}->{self.c_out}, {side})"


OVERHEAD_CASES = [
    Case("3d cross 3x3x3", 3, 4, 16, 32, 32, cross(3, 3), quick=True),
    Case("2d resnet 3x3 cross", 2, 32, 64, 64, 56, cross(3, 2)),
]

TAP_CASES = [
    Case("3d cross 3x3x3", 3, 4, 16, 32, 32, cross(3, 3), quick=True),
    Case("3d cross 3x3x3", 3, 2, 32, 64, 24, cross(3, 3)),
    Case("3d cross 3x3x3", 3, 8, 8, 8, 32, cross(3, 3)),
    Case("3d ball 5x5x5 r2", 3, 4, 16, 32, 32, ball(2, 3), quick=True),
    Case("3d ball 5x5x5 r2", 3, 2, 32, 64, 24, ball(2, 3)),
    Case("3d ball 5x5x5 r2", 3, 8, 8, 8, 32, ball(2, 3)),
    Case("2d cross 3x3", 2, 32, 64, 64, 56, cross(3, 2)),
    Case("causal 7x7 A", 2, 16, 3, 64, 128, causal_type_a(7)),
    Case("causal 7x7 A", 2, 32, 64, 64, 56, causal_type_a(7), quick=True),
    Case("1d 3 of 9 taps", 1, 64, 128, 128, 1024, spaced_1d(9, 3), quick=True),
    Case("3d random 7 of 3x3x3", 3, 4, 16, 32, 32, random_taps((3, 3, 3), 7, 0), quick=True),
    Case("3d random 20 of 5x5x5", 3, 4, 16, 32, 32, random_taps((5, 5, 5), 20, 1)),
    Case("2d random 12 of 7x7", 2, 16, 32, 64, 64, random_taps((7, 7), 12, 2), quick=True),
    Case("2d random 4 of 5x5", 2, 32, 64, 64, 56, random_taps((5, 5), 4, 3)),
]

# --smoke: one tiny case, to check that the script runs end to end; its times mean nothing.
SMOKE_CASES = [Case("3d cross 3x3x3", 3, 1, 2, 4, 6, cross(3, 3))]


# -- the machine's FMA peak ---------------------------------------------------------------

PROBE = r"""
#include <stdint.h>
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
#define CHAINS 12 /* independent FMA chains: more than latency times ports on these CPUs */
double fma_probe(int64_t iters, int nthreads) {
    double total = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        vf a[CHAINS], b = (vf){0} + 0.999999f, c = (vf){0} + 1e-7f;
        for (int i = 0; i < CHAINS; i++) a[i] = (vf){0} + 1e-3f * (float)i;
        for (int64_t it = 0; it < iters; it++)
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS; i++) a[i] = a[i] * b + c;
        for (int i = 0; i < CHAINS; i++)
            for (int l = 0; l < LANES; l++) total += a[i][l];
    }
    return total;
}
"""


def _probe_library() -> ctypes.CDLL | None:
    """The probe, built for the tap kernel's instruction set; None where it does not run."""
    isa = tap_kernel.isa()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if isa is None or compiler is None:
        return None
    lanes = tap_kernel.sizes()["lanes"]
    with tempfile.TemporaryDirectory() as tmp:
        src, lib_path = Path(tmp) / "probe.c", Path(tmp) / "probe.so"
        src.write_text(PROBE)
        flags = [*tap_build.FLAGS, *tap_build.ISAS[isa][1], f"-DLANES={lanes}"]
        subprocess.run([compiler, *flags, "-o", str(lib_path), str(src)], check=True)
        lib = ctypes.CDLL(str(lib_path))
    lib.fma_probe.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.fma_probe.restype = ctypes.c_double
    return lib


PROBE_RUNS = 100


def fma_peak(threads: int, runs: int = PROBE_RUNS) -> float | None:
    """GFLOP/s of FMAs on ``threads`` threads, in the tap kernel's ISA, best of many runs.

    Many short runs, the best: on a shared machine, some find the cores to themselves.
    """
    step = fma_probe_step(threads, iters=200_000)
    if step is None:
        return None
    run, flops = step
    best = float("inf")
    for _ in range(runs):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    return flops / best / 1e9


def fma_probe_step(threads: int, iters: int = 2_000_000) -> tuple[Fn, float] | None:
    """One run of the probe, and its flops: a variant to time among a case's, round by round."""
    lib = _probe_library()
    if lib is None:
        return None
    lanes = tap_kernel.sizes()["lanes"]
    return lambda: lib.fma_probe(iters, threads), 2 * lanes * 12 * iters * threads


def useful_flops(case: Case, backward: bool = True) -> float:
    """Flops of the active taps in one forward+backward: forward, input and weight gradients.

    Each of the three passes does the same work; ``backward=False`` counts the forward alone.
    """
    positions = case.batch * case.size**case.ndim
    passes = 3 if backward else 1
    return passes * 2 * positions * case.c_in * case.c_out * int(case.mask.sum())


# -- sections -------------------------------------------------------------------------------


def section_overhead(
    cases: list[Case], rounds: int, device: torch.device, timer: Timer
) -> list[Record]:
    print("\n== 1. Parametrization overhead: time / plain layer (same weights)")
    print(
        f"{'case':42s} {'pass':8s} {'plain ms':>9s}  {'masked':17s} {'masked+cached':17s} "
        f"{'prune':17s}"
    )
    records: list[Record] = []
    for case in cases:
        plain = case.layer(device)
        with torch.no_grad():
            plain.weight.mul_(case.mask.to(device))
        masked = apply_mask(copy.deepcopy(plain), case.mask.to(device))
        pruned = copy.deepcopy(plain)
        prune.custom_from_mask(pruned, "weight", case.mask.to(device).expand_as(plain.weight))
        x = case.input(device)
        grad = torch.randn_like(plain(x))

        def cached(step: Fn) -> Fn:
            def run() -> None:
                with parametrize.cached():
                    step()

            return run

        passes: dict[str, Callable[[nn.Module], Fn]] = {
            "fwd": lambda m, x=x: fwd(m, x),
            "fwd+bwd": lambda m, x=x, grad=grad: fwd_bwd(m, x, grad),
        }
        for label, make in passes.items():
            fns = {
                "plain": make(plain),
                "masked": make(masked),
                "cached": cached(make(masked)),
                "prune": make(pruned),
            }
            times = interleaved(fns, rounds, timer)
            print(
                f"{case!s:42s} {label:8s} {ms(times, 'plain'):>9s}  "
                f"{ratio(times, 'masked', 'plain'):17s} {ratio(times, 'cached', 'plain'):17s} "
                f"{ratio(times, 'prune', 'plain'):17s}"
            )
            records.append({"case": str(case), "pass": label, "seconds": times})
    return records


def taps_row(
    case: Case,
    label: str,
    times: dict[str, list[float]],
    flops: float,
    probe_flops: float | None,
    chosen: str | None = None,
) -> str:
    """One line of section 2 for one pass: ``times`` with "best_dense", ``flops`` its work.

    A column whose variants were not timed (channels-last, auto, the probe) reads n/a.
    """

    def per_round(num: str, den: str) -> str:
        return ratio(times, num, den) if num in times and den in times else "n/a"

    active = f"{int(case.mask.sum())}/{case.mask.numel()}"
    dense_cl = ms(times, "dense_cl") if "dense_cl" in times else "n/a"
    line = (
        f"{case!s:42s} {label:7s} {active:>7s} {ms(times, 'dense')} {dense_cl:>8s} "
        f"{ms(times, 'taps')} {per_round('taps', 'dense'):17s} "
        f"{per_round('taps', 'dense_cl'):17s} {per_round('taps_cl', 'dense_cl'):17s} "
        f"{per_round('taps', 'best_dense'):17s} {per_round('taps_cl', 'best_dense'):17s} "
        f"{per_round('auto', 'dense'):17s} {chosen or 'n/a':>8s}"
    )
    gflops = flops / statistics.median(times["taps"]) / 1e9
    if probe_flops is None:
        return line + f" {gflops:6.1f}   n/a"
    fraction = statistics.median(
        flops / t / (probe_flops / p) for t, p in zip(times["taps"], times["peak"], strict=True)
    )
    return line + f" {gflops:6.1f} {100 * fraction:4.0f}%"


def section_taps(
    cases: list[Case],
    rounds: int,
    device: torch.device,
    timer: Timer,
    memory: bool,
    probe: tuple[Fn, float] | None,
    brief: bool = False,
) -> list[Record]:
    """Time the variants of each case; ``brief``: dense and taps only (n/a for the rest).

    Two lines per case: forward+backward, then the forward alone, each timed interleaved.
    """
    print(
        "\n== 2. Active taps, forward+backward (fwd+bwd) and forward alone under no_grad (fwd): "
        "times in ms, ratios per round\n"
        "dense, taps: contiguous input and gradient; _cl: channels-last; best: the faster of "
        "dense and dense_cl, per round; GF/s, %peak: the pass's useful work (fwd: a third)"
    )
    header = (
        f"{'case':42s} {'pass':7s} {'active':>7s} {'dense':>8s} {'dense_cl':>8s} {'taps':>8s} "
        f"{'taps/dense':17s} {'taps/dense_cl':17s} {'taps_cl/dense_cl':17s} "
        f"{'taps/best':17s} {'taps_cl/best':17s} "
        f"{'auto/dense':17s} {'auto->':>8s} {'GF/s':>6s} {'%peak':>5s}"
    )
    if memory:
        header += f" {'mem taps/dense':>14s}"
    print(header)
    probe_flops = None if probe is None else probe[1]
    records: list[Record] = []
    for case in cases:
        dense = apply_mask(case.layer(device), case.mask.to(device))
        tapped = apply_mask(case.layer(device), case.mask.to(device), execution="taps")
        auto = apply_mask(case.layer(device), case.mask.to(device), execution="auto")
        x = case.input(device)
        grad = torch.randn_like(dense(x))
        fns = {"dense": fwd_bwd(dense, x, grad), "taps": fwd_bwd(tapped, x, grad)}
        forward_fns = {"dense": fwd(dense, x), "taps": fwd(tapped, x)}
        if not brief:
            fns["auto"] = fwd_bwd(auto, x, grad)
        if probe is not None:  # timed among the variants: %peak is a per-round ratio too
            fns["peak"] = probe[0]
            forward_fns["peak"] = probe[0]
        if case.ndim >= 2 and not brief:
            x_cl, grad_cl = channels_last(x), channels_last(grad)
            fns["dense_cl"] = fwd_bwd(dense, x_cl, grad_cl)
            fns["taps_cl"] = fwd_bwd(tapped, x_cl, grad_cl)
            forward_fns["dense_cl"] = fwd(dense, x_cl)
            forward_fns["taps_cl"] = fwd(tapped, x_cl)
        times = interleaved(fns, rounds, timer)
        add_best_dense(times)
        execution = auto.__dict__["_maskparam_execution"]
        chosen = ",".join(sorted(set(execution._choices.values()))) or "dense"
        line = taps_row(
            case, "fwd+bwd", times, useful_flops(case), probe_flops, None if brief else chosen
        )
        record: Record = {
            "case": str(case),
            "active": int(case.mask.sum()),
            "taps": case.mask.numel(),
            "auto_chose": None if brief else chosen,
            "useful_gflop": useful_flops(case) / 1e9,
            "seconds": times,
        }
        if memory:
            mem_dense = peak_bytes(fns["dense"], device)
            mem_taps = peak_bytes(fns["taps"], device)
            line += f" {mem_taps / max(1, mem_dense):8.2f} ({mem_dense / 2**20:.0f} MiB)"
            record["peak_bytes"] = {"dense": mem_dense, "taps": mem_taps}
        print(line, flush=True)
        forward_times = interleaved(forward_fns, rounds, timer)
        add_best_dense(forward_times)
        forward_flops = useful_flops(case, backward=False)
        line = taps_row(case, "fwd", forward_times, forward_flops, probe_flops)
        if memory:
            line += f" {'n/a':>8s}"
        print(line, flush=True)
        record["forward_seconds"] = forward_times
        records.append(record)
    return records


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


def resnet50() -> nn.Module:
    """ResNet-50's layout and widths (25.6M parameters, 53 convs), built here."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
    ]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def section_model(rounds: int, device: torch.device, timer: Timer) -> list[Record]:
    print("\n== 3. Whole model: apply_masks and bake on ResNet-50 (53 convs)")
    model = resnet50().to(device).eval()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53, len(convs)

    def mask_for(name: str, module: nn.Module) -> Tensor | None:
        if not isinstance(module, nn.Conv2d):
            return None
        return cross(module.kernel_size[0], 2).to(device)

    def apply_all() -> None:
        apply_masks(model, mask_for)

    def bake_all() -> None:
        remove_masks(model, bake=True)

    x = torch.randn(1, 3, 224, 224, device=device)
    forward = fwd(model, x)
    forward()
    apply_times: list[float] = []
    bake_times: list[float] = []
    forward_times: list[float] = []
    for _ in range(rounds):
        apply_times.append(timer(apply_all))
        bake_times.append(timer(bake_all))
        forward_times.append(timer(forward))
    med = {
        "apply": statistics.median(apply_times),
        "bake": statistics.median(bake_times),
        "forward": statistics.median(forward_times),
    }
    print(f"via apply_masks / remove_masks(bake=True); medians over {rounds} rounds")
    for key, values in (("apply", apply_times), ("bake", bake_times)):
        per = [a / b for a, b in zip(values, forward_times, strict=True)]
        print(
            f"{key:6s} {med[key] * 1e3:8.2f} ms  ({med[key] / 53 * 1e6:6.1f} us per conv)  "
            f"= {statistics.median(per):.3f} x one forward at batch 1, 224x224 "
            f"({med['forward'] * 1e3:.1f} ms)"
        )
    seconds = {"apply": apply_times, "bake": bake_times, "forward": forward_times}
    return [{"case": "resnet50 (53 convs), batch 1, 224x224", "seconds": seconds}]


# -- main -----------------------------------------------------------------------------------


def restart_for_isa(isa: str, argv: list[str] | None, script: Path) -> None:
    """Run ``script`` again with ``--isa`` set in the environment, unless it is already.

    ``avx2`` also caps oneDNN, which runs dense, at AVX2. oneDNN reads its cap when torch
    loads, so the process starts again with the environment set (it does not return then).
    """
    if isa == "native" or os.environ.get("MASKPARAM_TAP_ISA") == isa:
        return
    env = {**os.environ, "MASKPARAM_TAP_ISA": isa}
    if isa == "avx2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    sys.stdout.flush()
    given = sys.argv[1:] if argv is None else argv
    os.execve(sys.executable, [sys.executable, str(script.resolve()), *given], env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
    parser.add_argument(
        "--quick", action="store_true", help="5 rounds and a subset of cases, no memory"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny case, one round: does the script run?"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument("--sections", default="1,2,3", help="comma-separated, e.g. 2 or 1,3")
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory column")
    parser.add_argument(
        "--brief",
        action="store_true",
        help="section 2 times dense and taps only, not channels-last or auto (half the time)",
    )
    parser.add_argument(
        "--isa",
        choices=["native", "avx2", "avx512"],
        default="native",
        help="the tap kernel's instruction set; avx2 also caps oneDNN (dense) at AVX2",
    )
    args = parser.parse_args(argv)
    restart_for_isa(args.isa, argv, Path(__file__))

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    rounds = 5 if args.quick and args.rounds == 20 else args.rounds
    rounds = 1 if args.smoke else rounds
    timer = Timer(device)
    sections = {s.strip() for s in args.sections.split(",")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def pick(cases: list[Case]) -> list[Case]:
        if args.smoke:
            return SMOKE_CASES
        return [c for c in cases if (c.quick or not args.quick) and args.cases in str(c)]

    print(
        f"maskparam benchmarks: torch {torch.__version__}, {name}, "
        f"torch.get_num_threads()={torch.get_num_threads()}, rounds={rounds}, "
        f"tap kernel: {kernel_status()}, "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}"
    )
    probe = None
    peak = None
    if "2" in sections and device.type == "cpu":
        threads = torch.get_num_threads()
        probe = fma_probe_step(threads, iters=2_000 if args.smoke else 2_000_000)
        peak = fma_peak(threads, runs=1 if args.smoke else PROBE_RUNS)
        if peak is not None:
            print(
                f"FMA peak probe ({tap_kernel.isa()}, {threads} threads): {peak:.0f} GFLOP/s, "
                f"the best of {PROBE_RUNS} short runs; %peak below is per round, against "
                "the probe timed among the variants"
            )
    results: dict[str, list[Record]] = {}
    if "1" in sections:
        results["overhead"] = section_overhead(pick(OVERHEAD_CASES), rounds, device, timer)
    if "2" in sections:
        memory = not (args.quick or args.smoke or args.no_memory)
        results["taps"] = section_taps(
            pick(TAP_CASES), rounds, device, timer, memory, probe, args.brief
        )
    if "3" in sections:
        results["model"] = section_model(rounds, device, timer)
    if args.json is not None:
        about = {
            "command": " ".join(["python", "benchmarks/bench.py", *(argv or sys.argv[1:])]),
            "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": _machine(),
            "device": name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rounds": rounds,
            "tap_kernel": kernel_status(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "fma_peak_gflops": peak,
        }
        args.json.write_text(json.dumps({**about, "sections": results}, indent=1) + "\n")


def _commit() -> str | None:
    """The checkout's commit, with "+dirty" when files differ from it; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _machine() -> dict[str, object]:
    """The CPU's model name (Linux), architecture, core count and system."""
    model = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
