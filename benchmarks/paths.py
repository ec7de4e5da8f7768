"""Each path of maskparam.taps against the others, forward+backward, one conv at a time.

Run ``python benchmarks/paths.py`` (``--help`` for the options). For each case it prints the
median time of dense and, for every other path that can run the case, the median over the
rounds of its time divided by dense's in the same round (the paths interleaved, the order
rotating each round; 10th-90th percentile in brackets). "-" marks a path that does not take
the case (the tap kernel needs float32, stride 1, one group, contiguous input and
"same"-sized planes; dense_cl needs 2-D or 3-D). Every path's output is checked against
dense's. A path stays in maskparam only if it is the fastest on some case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskparam.apply import apply_mask
from maskparam.masks import ball, cross
from maskparam.taps import choose, memory
from maskparam.taps import paths as taps_paths

Case = tuple[str, Callable[[], nn.Module], Tensor, tuple[int, ...], bool, torch.dtype]


def spaced(k: int, active: int) -> Tensor:
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.linspace(0, k - 1, active).round().long()] = True
    return mask


CASES: list[Case] = [
    ("3d k3 cross 16ch 32^3", lambda: nn.Conv3d(16, 16, 3, padding=1), cross(3, ndim=3),
     (2, 16, 32, 32, 32), False, torch.float32),
    ("3d k3 cross 16ch 32^3 channels-last", lambda: nn.Conv3d(16, 16, 3, padding=1),
     cross(3, ndim=3), (2, 16, 32, 32, 32), True, torch.float32),
    ("3d k3 cross 16->32 stride 2", lambda: nn.Conv3d(16, 32, 3, padding=1, stride=2),
     cross(3, ndim=3), (2, 16, 32, 32, 32), False, torch.float32),
    ("3d k3 cross 16ch groups 4", lambda: nn.Conv3d(16, 16, 3, padding=1, groups=4),
     cross(3, ndim=3), (2, 16, 32, 32, 32), False, torch.float32),
    ("3d k3 cross 16ch float64", lambda: nn.Conv3d(16, 16, 3, padding=1), cross(3, ndim=3),
     (2, 16, 24, 24, 24), False, torch.float64),
    ("3d k5 ball 8ch 24^3", lambda: nn.Conv3d(8, 8, 5, padding=2), ball(5, ndim=3, radius=2),
     (2, 8, 24, 24, 24), False, torch.float32),
    ("3d k5 ball 8ch 24^3 channels-last", lambda: nn.Conv3d(8, 8, 5, padding=2),
     ball(5, ndim=3, radius=2), (2, 8, 24, 24, 24), True, torch.float32),
    ("2d k7 cross 32ch 64^2", lambda: nn.Conv2d(32, 32, 7, padding=3), cross(7, ndim=2),
     (8, 32, 64, 64), False, torch.float32),
    ("2d k7 cross 32ch 64^2 channels-last", lambda: nn.Conv2d(32, 32, 7, padding=3),
     cross(7, ndim=2), (8, 32, 64, 64), True, torch.float32),
    ("2d k7 cross 32ch padding 0", lambda: nn.Conv2d(32, 32, 7), cross(7, ndim=2),
     (8, 32, 64, 64), False, torch.float32),
    ("1d k9 3 taps 32ch 4096", lambda: nn.Conv1d(32, 32, 9, padding=4), spaced(9, 3),
     (8, 32, 4096), False, torch.float32),
]  # fmt: skip

PATHS = ("dense", "dense_cl", "kernel", "fused", "reference")


def takes(path: str, layer: nn.Module, x: Tensor) -> bool:
    """Whether ``path`` can run ``layer`` on ``x``."""
    boxes = layer.__dict__["_maskparam_execution"].boxes
    if path == "dense_cl":
        return x.dim() in (4, 5) and not memory.is_channels_last(x)
    if path == "kernel":
        call = choose.Call(layer, x, layer.weight, layer.bias, boxes=boxes)  # type: ignore[arg-type]
        return call.kernel_takes(boxes)
    return True


def run(path: str, layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` by ``path``."""
    boxes = layer.__dict__["_maskparam_execution"].boxes
    return taps_paths.run(path, layer, x, layer.weight, layer.bias, boxes)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated")
    parser.add_argument("--cases", default="", help="only cases whose name has this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    for name, make, mask, shape, cl, dtype in CASES:
        if args.cases not in name:
            continue
        torch.manual_seed(0)
        layer = apply_mask(make().to(dtype), mask, execution="taps")
        x = torch.randn(shape, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=memory.memory_format(x, True))
        runnable = [p for p in paths if takes(p, layer, x)]
        times: dict[str, list[float]] = {p: [] for p in runnable}
        expected = None
        for r in range(args.rounds + 1):
            order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
            for path in order:
                xx = x.detach().requires_grad_()
                start = time.perf_counter()
                y = run(path, layer, xx)
                y.backward(torch.ones_like(y))
                elapsed = time.perf_counter() - start
                if r:  # round 0 warms up
                    times[path].append(elapsed)
                if expected is None:
                    expected = y.detach()  # dense comes first in round 0
                tol = 1e-3 if dtype == torch.float32 else 1e-9
                torch.testing.assert_close(y.detach(), expected, rtol=tol, atol=tol)
        assert expected is not None
        dense = times["dense"]
        row = [f"{name:38s} dense {statistics.median(dense) * 1e3:8.1f} ms"]
        for path in paths[1:]:
            if path not in times:
                row.append(f"{path} {'-':>16s}")
                continue
            ratios = sorted(t / d for t, d in zip(times[path], dense, strict=True))
            lo, hi = ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]
            row.append(f"{path} {statistics.median(ratios):5.2f} [{lo:4.2f}-{hi:4.2f}]")
        print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
