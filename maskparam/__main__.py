"""The command line: ``python -m maskparam <command>``.

Thin on purpose: it parses arguments, then calls the public API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from maskparam import __version__

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from maskparam import demo

    return demo.run(steps=args.steps, seed=args.seed)


# The factories `show` reaches, and the options each one takes (it refuses the others).
_SHOW_FACTORIES: dict[str, tuple[str, ...]] = {
    "box": (),
    "cross": (),
    "diamond": ("radius",),
    "ball": ("radius", "spacing"),
    "hexagonal": (),
    "causal": ("kind", "in_channels", "out_channels", "channel_groups", "interleaved"),
    "dilated": ("dilation",),
    "blind_spot": ("radius",),
    "checkerboard": (),
    "line": ("axis",),
    "random": ("density", "seed"),
}
_SHOW_REQUIRED = {"dilated": "dilation", "line": "axis", "random": "density"}
_SHOW_OPTIONS = sorted({option for options in _SHOW_FACTORIES.values() for option in options})


def _show_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes such as 3x3x3 or 5. Got {text!r}."
        ) from None
    return sizes


def _show_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers such as 2.5,0.7,0.7. Got {text!r}."
        ) from None


def _show_flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _show(args: argparse.Namespace) -> int:
    import torch

    from maskparam import masks

    name: str = args.factory
    # Identity, not equality: --axis 0 and --radius 0 are given, though 0 == False.
    given = {o: v for o in _SHOW_OPTIONS if (v := getattr(args, o)) is not None and v is not False}
    stray = [o for o in given if o not in _SHOW_FACTORIES[name]]
    if stray:
        takes = ", ".join(map(_show_flag, _SHOW_FACTORIES[name])) or "no options"
        args.error(f"{name} takes {takes}. Got {', '.join(map(_show_flag, stray))}.")
    required = _SHOW_REQUIRED.get(name)
    if required is not None and required not in given:
        args.error(f"{name} needs {_show_flag(required)}.")
    size: tuple[int, ...] = args.size
    for option in ("dilation", "spacing"):
        if option in given and len(given[option]) == 1:
            given[option] = given[option][0]  # one number: the same along every axis
    if name == "random":
        given["generator"] = torch.Generator().manual_seed(given.pop("seed", 0))
    if name == "hexagonal" and len(size) == 1:
        given["kernel_size"] = size[0]
    else:
        given["kernel_size" if name != "random" else "shape"] = size
    try:
        mask: Tensor = getattr(masks, name)(**given)
        text = _show_text(mask, channels=name == "causal" and "in_channels" in given)
    except (TypeError, ValueError) as err:
        args.error(str(err))
    taps = f"{int(mask.sum())} of {mask.numel()} taps"
    if args.png is not None and mask.dim() > 3:
        args.error(
            f"--png draws masks of 1 to 3 dims. Got shape={tuple(mask.shape)}: drop --png to "
            "print it as text."
        )
    if args.png is None:
        print(text)
        print(taps)
        return 0
    return _show_png(args, mask, f"{name} {'x'.join(map(str, size))}: {taps}")


def _show_text(mask: Tensor, *, channels: bool) -> str:
    """The text form; beyond 3-D, one labelled block per (out, in) pair or leading index."""
    import itertools

    from maskparam.masks import to_text

    lead = 2 if channels else max(mask.dim() - 3, 0)
    blocks = []
    for index in itertools.product(*map(range, mask.shape[:lead])):
        label = f"out {index[0]}, in {index[1]}:\n" if channels else f"{list(index)}:\n"
        blocks.append((label if lead else "") + to_text(mask[index]))
    return "\n\n".join(blocks)


def _show_png(args: argparse.Namespace, mask: Tensor, title: str) -> int:
    from maskparam.plot import plot_mask

    try:
        figure = plot_mask(mask)
    except ImportError as err:
        print(f"python -m maskparam show: {err}", file=sys.stderr)
        return 1
    import matplotlib.pyplot as plt

    figure.axes[0].set_title(title)
    try:
        figure.savefig(args.png, bbox_inches="tight", dpi=150)
    except OSError as err:
        print(f"python -m maskparam show: cannot write {args.png}: {err}", file=sys.stderr)
        return 1
    finally:
        plt.close(figure)
    print(f"wrote {args.png}: {title}")
    return 0


_BAKE = "maskparam bake"


def _bake(args: argparse.Namespace) -> int:
    from maskparam import checkpoint

    # The public bake_file's checks, with messages that speak of the command's options.
    voice = checkpoint._Voice(_BAKE, overwrite="--overwrite", key=lambda key: f"--key {key}")
    try:
        baked = checkpoint._bake_file(
            args.input, args.output, overwrite=args.overwrite, key=args.key, voice=voice
        )
    except (OSError, TypeError, ValueError) as err:
        # A file or its contents, not the command line: no usage text, the message alone,
        # which names the command (the system's own OSError messages get the name here).
        message = str(err)
        if not message.startswith(_BAKE):
            message = f"{_BAKE}: {message}"
        print(message, file=sys.stderr)
        return 2
    under = f" under {args.key!r}" if args.key is not None else ""
    if baked:
        tensors = "tensor" if len(baked) == 1 else "tensors"
        print(f"baked {len(baked)} masked {tensors}{under} into {args.output}: {', '.join(baked)}")
    else:
        print(f"no masked tensors in {args.input}{under}; wrote it unchanged to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-command per task."""
    parser = argparse.ArgumentParser(
        prog="python -m maskparam",
        description="Fixed masks for PyTorch weights.",
    )
    parser.add_argument("--version", action="version", version=f"maskparam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a cross-masked Conv3d on synthetic data and check the results"
    )
    demo.add_argument("--steps", type=int, default=150, help="Adam steps (default 150)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)

    show = commands.add_parser(
        "show",
        help="print a named mask as text with its tap count, or draw it (--png)",
        description="Print a mask from maskparam.masks as text, or draw it with --png.",
        epilog="examples: show cross 3x3x3 | show ball 5x5x5 --radius 2 | "
        "show causal 5x5 --kind B | show random 8x8 --density 0.25 --png mask.png",
    )
    show.add_argument(
        "factory",
        choices=list(_SHOW_FACTORIES),
        metavar="FACTORY",
        help=f"one of {', '.join(_SHOW_FACTORIES)}",
    )
    show.add_argument(
        "size",
        type=_show_sizes,
        metavar="SIZE",
        help="the kernel size, such as 3x3x3 (5 for 1-D); for random, the shape",
    )
    option = show.add_argument
    option("--radius", type=float, metavar="R", help="diamond, ball, blind_spot: the radius")
    option(
        "--spacing",
        type=_show_floats,
        metavar="S",
        help="ball: the voxel spacing, one number or one per axis, such as 2.5,1,1",
    )
    option("--kind", choices=["A", "B"], help="causal: type A or B (default A)")
    option("--in-channels", type=int, metavar="N", help="causal, channel-group form: in channels")
    option(
        "--out-channels", type=int, metavar="N", help="causal, channel-group form: out channels"
    )
    option("--channel-groups", type=int, metavar="G", help="causal: how many groups (default 3)")
    option("--interleaved", action="store_true", help="causal: channel c is in group c %% G")
    option("--dilation", type=_show_sizes, metavar="D", help="dilated: the dilation, such as 2")
    option("--axis", type=int, help="line: the axis it runs along")
    option("--density", type=float, metavar="P", help="random: the fraction of taps kept")
    option("--seed", type=int, help="random: the seed (default 0)")
    option("--png", metavar="FILE", help="write a picture to FILE instead (needs matplotlib)")
    show.set_defaults(func=_show, error=show.error)

    bake = commands.add_parser(
        "bake",
        help="turn a masked model's state_dict file into a plain one, masked values baked in",
        description="Bake a state_dict file saved from a masked model into a plain state_dict "
        "that the unmasked architecture loads with strict=True (see "
        "maskparam.checkpoint.bake_file). With --key, bake the state_dict nested in a "
        "training checkpoint and keep its other entries. Exits with 2 on any error.",
    )
    explain = {
        "IN": "a file from torch.save(model.state_dict(), IN), or a checkpoint with --key",
        "OUT": "where to write the baked state_dict",
        "--overwrite": "allow replacing OUT if it exists, even when it is IN (default: refuse)",
        "--key": "the entry of a training checkpoint that holds the state_dict, such as model "
        "(dots for deeper levels: ema.model); OUT keeps the other entries as they are",
    }
    bake.add_argument("input", metavar="IN", help=explain["IN"])
    bake.add_argument("output", metavar="OUT", help=explain["OUT"])
    bake.add_argument("--overwrite", action="store_true", help=explain["--overwrite"])
    bake.add_argument("--key", metavar="NAME", help=explain["--key"])
    bake.set_defaults(func=_bake, error=bake.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
