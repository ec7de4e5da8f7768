"""Tap pruning a trained CNN on scikit-learn's 8x8 digits: accuracy and time against taps kept.

Run ``python benchmarks/prune_digits.py`` (needs scikit-learn, which ships the data, and
matplotlib). It trains a small CNN of three 3x3 Conv2d layers, then for each budget of taps
per kernel (9, 7, 5, 3, 2, 1 of 9) prunes every conv three ways and fine-tunes each briefly:

- ``top_taps``: the taps with the largest L2 norm over the channel pairs, from the trained
  weights (:func:`maskparam.masks.top_taps`), run with ``execution="taps"``;
- ``random``: the same number of taps per kernel drawn at random
  (:func:`maskparam.masks.random`), also run with ``execution="taps"``; the mean of five
  draws;
- ``l1_unstructured``: the same number of weights per layer, the smallest in magnitude,
  anywhere in the weight (``torch.nn.utils.prune.l1_unstructured``); it runs dense.

It prints two Markdown tables, test accuracy and forward+backward time (a training step's,
batch 256) as a ratio to the dense model, the time also for the ``top_taps`` model with
``execution="auto"`` (which measures once per input shape whether dense, channels-last or
the active taps is fastest), and draws both into a PNG (by default
``docs/_static/images/prune-digits.png``). Times are measured in this one process with the
variants interleaved round by round (the order rotates each round); a ratio is the median
over the rounds of the per-round ratio. Every seed is fixed: the accuracies repeat exactly
on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskparam import apply_masks, masks  # noqa: E402
from maskparam.taps import kernel_status  # noqa: E402

BUDGETS = (9, 7, 5, 3, 2, 1)  # taps kept per 3x3 kernel
RANDOM_DRAWS = 5
TRAIN_EPOCHS = 12
FINE_TUNE_EPOCHS = 3
BATCH = 64
TIME_BATCH = 256


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 1797 8x8 digits, scaled to [0, 1], split 1297 for training and 500 for testing."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1297], order[1297:]
    return x[train], y[train], x[test], y[test]


def small_cnn() -> nn.Sequential:
    """Three 3x3 convs with "same" padding (so the tap kernel applies), two poolings."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2x2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)


def pruned_top(trained: nn.Module, kept: int, execution: str = "taps") -> nn.Module:
    model = copy.deepcopy(trained)
    apply_masks(
        model,
        lambda name, m: masks.top_taps(m.weight, kept) if is_conv(m) else None,
        execution=execution,  # type: ignore[arg-type]
    )
    return model


def pruned_random(trained: nn.Module, kept: int, draw: int) -> nn.Module:
    model = copy.deepcopy(trained)
    gen = torch.Generator().manual_seed(1000 + draw)
    apply_masks(
        model,
        lambda name, m: masks.random((3, 3), kept / 9, generator=gen) if is_conv(m) else None,
        execution="taps",
    )
    return model


def pruned_l1(trained: nn.Module, kept: int) -> nn.Module:
    model = copy.deepcopy(trained)
    for m in model.modules():
        if is_conv(m):
            # The same number of weights as the tap masks keep: kept / 9 of the weight.
            prune.l1_unstructured(m, "weight", amount=m.weight.numel() * (9 - kept) // 9)
    return model


def step_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return step


def time_ratios(models: dict[str, nn.Module], x: Tensor, y: Tensor, rounds: int) -> dict:
    """Median per-round time ratio of each model to ``models["dense"]``, and dense's ms."""
    steps = {name: step_fn(m, x, y) for name, m in models.items()}
    for step in steps.values():  # warm up: first calls compile, plan and allocate
        for _ in range(3):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    result = {
        name: statistics.median(t / d for t, d in zip(times[name], times["dense"], strict=True))
        for name in names
    }
    result["dense_ms"] = statistics.median(times["dense"]) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds per budget")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--png", type=Path, default=ROOT / "docs" / "_static" / "images" / "prune-digits.png"
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    trained = small_cnn()
    train(trained, x_train, y_train, TRAIN_EPOCHS, lr=2e-3, seed=1)
    dense_accuracy = accuracy(trained, x_test, y_test)

    gen = torch.Generator().manual_seed(2)
    x_time = x_train[torch.randint(len(y_train), (TIME_BATCH,), generator=gen)]
    y_time = y_train[torch.randint(len(y_train), (TIME_BATCH,), generator=gen)]

    rows = []
    for kept in BUDGETS:
        variants: dict[str, list[nn.Module]] = {
            "top_taps": [pruned_top(trained, kept)],
            "random": [pruned_random(trained, kept, d) for d in range(RANDOM_DRAWS)],
            "l1_unstructured": [pruned_l1(trained, kept)],
        }
        row: dict[str, float] = {"kept": kept}
        for name, models in variants.items():
            before, after = [], []
            for i, model in enumerate(models):
                before.append(accuracy(model, x_test, y_test))
                train(model, x_train, y_train, FINE_TUNE_EPOCHS, lr=5e-4, seed=10 + i)
                after.append(accuracy(model, x_test, y_test))
            row[f"{name} pruned"] = statistics.mean(before)
            row[f"{name} tuned"] = statistics.mean(after)
        timed = {
            "dense": trained,
            "top_taps": variants["top_taps"][0],
            "top_taps auto": pruned_top(trained, kept, execution="auto"),
            "random": variants["random"][0],
            "l1_unstructured": variants["l1_unstructured"][0],
        }
        row.update(time_ratios(timed, x_time, y_time, args.rounds))
        rows.append(row)

    print(
        f"Digits: 1297 training and 500 test images; dense test accuracy "
        f"{dense_accuracy:.1f}% after {TRAIN_EPOCHS} epochs. Fine-tuning: {FINE_TUNE_EPOCHS} "
        f"epochs per pruned model. random: mean of {RANDOM_DRAWS} draws."
    )
    spread = ", ".join(
        f"{name}: {float(n.max() / n.min()):.2f}"
        for name, m in trained.named_modules()
        if is_conv(m)
        for n in [m.weight.detach().square().sum(dim=(0, 1)).sqrt()]
    )
    print(f"Tap norms of the trained convs, largest / smallest of the 9 taps: {spread}.")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, tap kernel: {kernel_status()}"
    )
    print()
    print("Test accuracy (%), just pruned -> after fine-tuning:")
    print()
    print("| taps kept | fraction | top_taps | random | l1_unstructured |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [
            f"{row[f'{name} pruned']:.1f} -> {row[f'{name} tuned']:.1f}"
            for name in ("top_taps", "random", "l1_unstructured")
        ]
        print(f"| {row['kept']} of 9 | {row['kept'] / 9:.2f} | " + " | ".join(cells) + " |")
    print()
    print(
        f"Forward+backward time (batch {TIME_BATCH}, {args.rounds} interleaved rounds), "
        "ratio to the dense model:"
    )
    print()
    print(
        "| taps kept | fraction | top_taps, taps | top_taps, auto | random, taps "
        "| l1_unstructured | dense ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['kept']} of 9 | {row['kept'] / 9:.2f} | {row['top_taps']:.2f} | "
            f"{row['top_taps auto']:.2f} | {row['random']:.2f} | {row['l1_unstructured']:.2f} "
            f"| {row['dense_ms']:.1f} |"
        )
    print()
    plot(rows, dense_accuracy, args.png)
    print(f"Wrote {args.png.relative_to(ROOT) if args.png.is_relative_to(ROOT) else args.png}")
    print(f"Total run time: {time.perf_counter() - began:.0f} s")


def plot(rows: list[dict], dense_accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [row["kept"] / 9 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    styles = {"top_taps": "C0", "random": "C1", "l1_unstructured": "C2"}
    for name, color in styles.items():
        left.plot(fractions, [r[f"{name} tuned"] for r in rows], "o-", color=color, label=name)
        left.plot(
            fractions,
            [r[f"{name} pruned"] for r in rows],
            "o--",
            color=color,
            alpha=0.5,
            label=f"{name}, before fine-tuning",
        )
    left.axhline(dense_accuracy, color="grey", lw=0.8, label="dense")
    left.set(xlabel="fraction of weights kept", ylabel="test accuracy (%)", ylim=(0, 100))
    left.set_title("Accuracy", fontsize=10)
    left.legend(fontsize=7, loc="lower right")
    for name in ("top_taps", "random", "l1_unstructured"):
        label = f"{name}" + (', execution="taps"' if name != "l1_unstructured" else "")
        right.plot(fractions, [r[name] for r in rows], "o-", color=styles[name], label=label)
    right.plot(
        fractions,
        [r["top_taps auto"] for r in rows],
        "s:",
        color=styles["top_taps"],
        label='top_taps, execution="auto"',
    )
    right.axhline(1.0, color="grey", lw=0.8, label="dense")
    right.set(xlabel="fraction of weights kept", ylabel="time / dense time", ylim=(0, None))
    right.set_title(f"Forward+backward time, batch {TIME_BATCH}", fontsize=10)
    right.legend(fontsize=7, loc="upper left")
    for ax in (left, right):
        ax.set_xticks([round(f, 2) for f in fractions])
        ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
