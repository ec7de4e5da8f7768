"""Two tap kernels in one process: this checkout's against another checkout's.

``python benchmarks/kernel_ab.py --against ../old-checkout`` times, for each case of
``bench.py``'s section 2, forward+backward of one masked layer with ``execution="taps"``
twice per round: once as it runs here ("new"), and once with the other checkout's
``maskparam/taps/kernel.py`` (built from its own ``tapconv.c``) doing the kernel calls
("old"); dense and the FMA probe are timed among them, as bench.py does. It prints the median
of the ratio new/old over pairs of rounds, with its 10th-90th percentile spread, and each
against dense (per round, as bench.py gives it).

Timing the two kernels round by round in one process cancels what separate bench.py runs
cannot: the load of a shared machine, and a dense time that swings from run to run. What runs
just before a step matters too: right after dense (which leaves the caches cold and returns
memory to the system) a step takes a few percent longer. So each round runs dense, then the
two kernels, then the probe, and every other round the kernels swap places; a ratio is taken
over two such rounds, one of each order. The other checkout's ``kernel.py`` must offer
``conv`` and ``conv_backward`` with this one's arguments.
``--isa avx2`` runs both kernels, and dense, as on a CPU without AVX-512 (see bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch


def _load_other(checkout: Path) -> ModuleType:
    path = checkout / "maskparam" / "taps" / "kernel.py"
    spec = importlib.util.spec_from_file_location("maskparam_other_kernel", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no kernel.py at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paired_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, timer: Callable[..., float]
) -> dict[str, list[float]]:
    """Seconds per round of each: dense, new, old, peak; new and old swap every other round."""
    for name in fns:  # a warm-up of each
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + rounds % 2):
        pair = ["new", "old"] if r % 2 == 0 else ["old", "new"]
        for name in ["dense", *pair, *(["peak"] if "peak" in fns else [])]:
            times[name].append(timer(fns[name]))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, type=Path, help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--isa", choices=["native", "avx2", "avx512"], default="native")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # the cases, the timer and the ratios of bench.py

    bench.restart_for_isa(args.isa, argv, Path(__file__))

    from maskparam.apply import apply_mask
    from maskparam.taps import kernel

    other = _load_other(args.against.resolve())
    if kernel.library() is None or other.library() is None:
        raise SystemExit(f"a kernel does not run: {kernel.status()}; {other.status()}")
    print(
        f"this kernel {kernel.status()} against {args.against}: {other.status()}; "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    device = torch.device("cpu")
    timer = bench.Timer(device)
    probe = bench.fma_probe_step(torch.get_num_threads())
    ours = (kernel.conv, kernel.conv_backward)
    for case in [c for c in bench.TAP_CASES if args.cases in str(c)]:
        dense = apply_mask(case.layer(device), case.mask)
        tapped = apply_mask(case.layer(device), case.mask, execution="taps")
        x = case.input(device)
        grad = torch.randn_like(dense(x))
        step = bench.fwd_bwd(tapped, x, grad)

        def other_step(step: bench.Fn = step) -> None:
            kernel.conv, kernel.conv_backward = other.conv, other.conv_backward
            try:
                step()
            finally:
                kernel.conv, kernel.conv_backward = ours

        fns = {"dense": bench.fwd_bwd(dense, x, grad), "new": step, "old": other_step}
        if probe is not None:
            fns["peak"] = probe[0]
        times = _paired_rounds(fns, args.rounds, timer)
        pairs = [
            (times["new"][i] + times["new"][i + 1]) / (times["old"][i] + times["old"][i + 1])
            for i in range(0, len(times["new"]) - 1, 2)
        ]
        print(
            f"{case!s:44s} new/old {statistics.median(pairs):.3f} "
            f"[{bench.quantile(pairs, 0.1):.2f}-{bench.quantile(pairs, 0.9):.2f}]  "
            f"new/dense {bench.ratio(times, 'new', 'dense')}  "
            f"old/dense {bench.ratio(times, 'old', 'dense')}",
            flush=True,
        )


if __name__ == "__main__":
    main()
