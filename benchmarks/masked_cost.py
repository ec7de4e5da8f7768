"""What a mask costs: memory, checkpoint size and optimizer step time against a plain model.

    python benchmarks/masked_cost.py [--rounds 30]

Eight 512-to-512 3x3 convs (72 MiB of float32 weights), masked with a 3x3 cross. Memory counts
every tensor the model holds (parameters, buffers, tensors kept as module attributes);
checkpoint size is ``torch.save(model.state_dict())``. The step time is an AdamW step with
weight decay, masked against plain, interleaved in one process, median of the per-round
ratios; the masked step includes holding the masked values aside and putting them back.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from torch import nn

import maskparam
from maskparam import masks

MiB = 2**20


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Conv2d(512, 512, 3, padding=1) for _ in range(8)])


def held_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for m in module.modules():
        tensors = [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


def step_seconds(module: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    plain, masked = model(), model()
    maskparam.apply_masks(masked, masks.cross(3, ndim=2), include=nn.Conv2d)
    print(
        f"maskparam {maskparam.__version__}, torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}, rounds={args.rounds}"
    )
    print()
    print("| | plain | masked | masked / plain |")
    print("| --- | ---: | ---: | ---: |")
    for label, measure in (("memory", held_bytes), ("state_dict file", checkpoint_bytes)):
        a, b = measure(plain), measure(masked)
        print(f"| {label} | {a / MiB:.1f} MiB | {b / MiB:.1f} MiB | {b / a:.4f} |")

    optimizers = {}
    for name, net in (("plain", plain), ("masked", masked)):
        optimizers[name] = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
    ratios, times = [], {"plain": [], "masked": []}
    for _ in range(args.rounds):
        t_plain = step_seconds(plain, optimizers["plain"])
        t_masked = step_seconds(masked, optimizers["masked"])
        times["plain"].append(t_plain)
        times["masked"].append(t_masked)
        ratios.append(t_masked / t_plain)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"| AdamW step (weight decay) | {statistics.median(times['plain']) * 1e3:.1f} ms "
        f"| {statistics.median(times['masked']) * 1e3:.1f} ms "
        f"| {statistics.median(ratios):.3f} [{quartiles[0]:.3f}-{quartiles[2]:.3f}] |"
    )


if __name__ == "__main__":
    main()
