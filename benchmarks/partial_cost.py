"""The cost of a data-derived bias: partial_conv with validity x != 0 against a plain conv.

Quoted in docs/faq.md ("Can the bias be added only at locations of interest?"). Both sides
run the same cross-masked 3x3 Conv2d weights on the same input; the plain side is the layer
with ``bias_mode="keep"`` called as ``conv(x)``, the other ``bias_mode="valid"`` called as
``partial_conv(conv, x, x != 0)`` (validity per input channel, so the comparison ``x != 0``
is inside the timed call). Each round times both, in alternating order; the ratio printed is
the median over the rounds of the per-round time ratio, forward only (``no_grad``) and
forward+backward.

    python benchmarks/partial_cost.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import maskparam
from maskparam import masks, partial_conv


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shape = (8, 32, 64, 64)  # batch 8, 32 channels in and out, 64x64
    x = torch.randn(shape)
    x[torch.rand(shape) < 0.5] = 0.0  # half the input zero, as sparse data
    plain = maskparam.apply_mask(nn.Conv2d(32, 32, 3, padding=1), masks.cross(3, ndim=2))
    valid = copy.deepcopy(plain)
    maskparam.remove_mask(valid, bake=False)
    valid = maskparam.apply_mask(valid, masks.cross(3, ndim=2), bias_mode="valid")

    def forward_plain() -> object:
        with torch.no_grad():
            return plain(x)

    def forward_valid() -> object:
        with torch.no_grad():
            return partial_conv(valid, x, x != 0)

    def backward_plain() -> None:
        plain(x).sum().backward()

    def backward_valid() -> None:
        partial_conv(valid, x, x != 0)[0].sum().backward()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {shape}")
    for label, a, b in (
        ("forward", forward_plain, forward_valid),
        ("forward+backward", backward_plain, backward_valid),
    ):
        for _ in range(3):  # warm up both
            a(), b()
        ratios, times = [], []
        for r in range(args.rounds):
            pair = (a, b) if r % 2 == 0 else (b, a)
            t = {fn: _time(fn) for fn in pair}
            ratios.append(t[b] / t[a])
            times.append(t[a])
        print(
            f"{label}: partial_conv(x != 0) / conv(x) = {statistics.median(ratios):.2f} "
            f"(plain conv {1000 * statistics.median(times):.1f} ms)"
        )


if __name__ == "__main__":
    main()
