"""What the optimizer hold costs a step: against other masked modules alive, and a whole model.

    python benchmarks/hold_cost.py [--rounds 40] [--alive 1000]

1. AdamW (weight decay) over one masked ``Conv2d(8, 8, 3)``, with no other masked module
   alive and with ``--alive`` of them: the hold looks only at the optimizer's own
   parameters, so the ratio should stay near 1.
2. AdamW over eight masked 512-to-512 3x3 convs (a 3x3 cross), against the same model
   unmasked: what holding the masked values aside and putting them back costs.

The first case alternates its two states round by round; the second interleaves the masked
and plain steps and gives the median of per-round ratios with its 10th and 90th percentiles.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import maskparam
from maskparam import masks

PLUS = masks.cross(3, ndim=2)


def _optimizer(module: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # state, and the first step's one-time registry check
    return opt


def _seconds(step: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    return (time.perf_counter() - start) / repeat


def _ratio(
    baseline: Callable[[], object], measured: Callable[[], object], rounds: int, repeat: int
) -> tuple[float, float, float, float, float]:
    """Medians of both times and of their per-round ratio, with its 10th and 90th percentile."""
    ratios, base, meas = [], [], []
    for i in range(rounds):
        order = (baseline, measured) if i % 2 == 0 else (measured, baseline)
        times = {id(step): _seconds(step, repeat) for step in order}
        base.append(times[id(baseline)])
        meas.append(times[id(measured)])
        ratios.append(meas[-1] / base[-1])
    deciles = statistics.quantiles(ratios, n=10)
    return (
        statistics.median(base),
        statistics.median(meas),
        statistics.median(ratios),
        deciles[0],
        deciles[-1],
    )


def alive_case(rounds: int, alive: int) -> tuple[float, float]:
    """The masked step's time with no other masked module alive, and with ``alive`` of them.

    The two states alternate round by round (the others made, then freed), so that a drift
    of the machine's speed falls on both. Each is the median over its rounds.
    """
    torch.manual_seed(0)
    opt = _optimizer(maskparam.apply_mask(nn.Conv2d(8, 8, 3), PLUS))
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * rounds):
        crowded = i % 2 == 1
        others = [maskparam.apply_mask(nn.Conv2d(8, 8, 3), PLUS) for _ in range(alive * crowded)]
        gc.collect()
        opt.step()
        times[crowded].append(statistics.median(_seconds(opt.step, 20) for _ in range(5)))
        del others
    return statistics.median(times[False]), statistics.median(times[True])


def model_case(rounds: int) -> tuple[float, float, float, float, float]:
    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Conv2d(512, 512, 3, padding=1) for _ in range(8)])

    plain, masked = model(), model()
    maskparam.apply_masks(masked, PLUS, include=nn.Conv2d)
    return _ratio(_optimizer(plain).step, _optimizer(masked).step, rounds, repeat=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--alive", type=int, default=1000)
    args = parser.parse_args()
    print(
        f"maskparam {maskparam.__version__}, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}, rounds={args.rounds}"
    )
    print()
    none, crowded = alive_case(args.rounds, args.alive)
    print("| case | time | ratio |")
    print("| --- | ---: | ---: |")
    label = "AdamW, one masked Conv2d(8, 8, 3), no other masked module alive"
    print(f"| {label} | {none * 1e6:.1f} us | |")
    print(
        f"| the same, {args.alive} other masked modules alive | {crowded * 1e6:.1f} us "
        f"| {crowded / none:.3f} of none alive |"
    )
    base, meas, ratio, low, high = model_case(args.rounds)
    print(
        f"| AdamW, eight 512-to-512 3x3 convs, a 3x3 cross, masked | {meas * 1e3:.1f} ms "
        f"| {ratio:.3f} [{low:.3f}-{high:.3f}] of plain ({base * 1e3:.1f} ms) |"
    )


if __name__ == "__main__":
    main()
