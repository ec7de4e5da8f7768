"""plot_mask draws a mask as a picture, and ``python -m maskparam show`` prints or saves one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from maskparam.__main__ import main
from maskparam.masks import (
    ball,
    blind_spot,
    box,
    causal,
    cross,
    diamond,
    dilated,
    hexagonal,
    line,
    random,
    to_text,
)
from maskparam.plot import plot_mask

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def cells_of(figure: Any) -> PatchCollection:
    (collection,) = [c for c in figure.axes[0].collections if isinstance(c, PatchCollection)]
    return collection


def centres_of(figure: Any) -> list[tuple[float, float]]:
    return [p.center for p in figure.axes[0].patches if isinstance(p, Circle)]


# -- pictures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([1, 0, 1, 1, 0]),
        cross(5, ndim=2),
        ball(3, ndim=3),
        random((4, 6), 0.5, generator=torch.Generator().manual_seed(0)),
        torch.ones(1, dtype=torch.bool),
    ],
    ids=["1d", "2d", "3d", "2d-even", "single"],
)
def test_smoke(mask: torch.Tensor) -> None:
    figure = plot_mask(mask)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 1
    assert png_bytes(figure).startswith(PNG_SIGNATURE)
    assert plt.fignum_exists(figure.number)  # a pyplot figure: plt.show() would show it


@pytest.mark.parametrize(
    "mask", [torch.tensor([1, 0, 0, 1, 1]), hexagonal(5), causal(3, ndim=3, kind="B")]
)
def test_active_taps_are_filled(mask: torch.Tensor) -> None:
    faces = [tuple(f) for f in cells_of(plot_mask(mask)).get_facecolors()]
    active = mask.flatten().tolist()
    assert len(faces) == len(active)
    on = {f for f, a in zip(faces, active, strict=True) if a}
    off = {f for f, a in zip(faces, active, strict=True) if not a}
    assert len(on) == len(off) == 1  # one colour each, and different ones
    ((r1, g1, b1, _),), ((r0, g0, b0, _),) = on, off
    assert r1 + g1 + b1 < r0 + g0 + b0 - 1  # active cells are clearly darker


def test_3d_is_a_row_of_labelled_slices() -> None:
    mask = torch.zeros(3, 2, 4, dtype=torch.bool)
    figure = plot_mask(mask)
    cells = cells_of(figure).get_paths()
    corners = [(round(p.get_extents().x0), round(p.get_extents().y0)) for p in cells]
    # cell (s, i, j) sits at column s * (4 + 1) + j, row i: slices side by side, one apart
    expected = [(s * 5 + j, i) for s in range(3) for i in range(2) for j in range(4)]
    assert corners == expected
    assert [t.get_text() for t in figure.axes[0].texts] == ["[0]", "[1]", "[2]"]


@pytest.mark.parametrize(
    ("mask", "centre"),
    [
        (torch.ones(5, dtype=torch.bool), (2.5, 0.5)),
        (torch.ones(3, 5, dtype=torch.bool), (2.5, 1.5)),
        (torch.ones(3, 3, 3, dtype=torch.bool), (5.5, 1.5)),  # middle slice starts at 4
        (blind_spot(3, ndim=2), (1.5, 1.5)),  # marked also when the centre is off
        (torch.ones(3, 4, dtype=torch.bool), None),
        (torch.ones(2, 3, 3, dtype=torch.bool), None),
    ],
)
def test_centre_is_marked(mask: torch.Tensor, centre: tuple[float, float] | None) -> None:
    assert centres_of(plot_mask(mask)) == ([] if centre is None else [centre])


def test_draws_into_given_axes() -> None:
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_mask(cross(3, ndim=2), ax=ax) is figure
    assert cells_of(figure).get_facecolors().shape[0] == 9
    assert png_bytes(figure).startswith(PNG_SIGNATURE)


def test_returns_the_root_figure_from_a_subfigure() -> None:
    figure = Figure()
    ax = figure.subfigures(1, 2)[1].add_subplot()
    assert plot_mask(cross(3, ndim=3), ax=ax) is figure


def test_large_masks_get_a_bounded_figure() -> None:
    width, height = plot_mask(torch.ones(3, 40, 60, dtype=torch.bool)).get_size_inches()
    assert width <= 12.5
    assert height <= 8.5


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.tensor(True), ValueError, r"plot_mask draws masks of 1 to 3 dims.*Got shape=\(\)"),
        (torch.ones(2, 2, 3, 3), ValueError, r"Got shape=\(2, 2, 3, 3\)"),
        (torch.ones(0, 3), ValueError, r"every size to be at least 1\. Got shape=\(0, 3\)"),
        (torch.tensor([0.5, 1.0]), ValueError, "values are all 0 or 1"),
        ("#.#", TypeError, "plot_mask expects the mask as a tensor"),
    ],
)
def test_exception(mask: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plot_mask(mask)
    assert not plt.get_fignums()  # nothing drawn before the error


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, name, None)


def test_exception_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_matplotlib(monkeypatch)
    with pytest.raises(
        ImportError, match=r'plot_mask needs matplotlib.*pip install "maskparam\[plot\]"'
    ):
        plot_mask(cross(3, ndim=2))


# -- the show command -------------------------------------------------------------------------

SHOWN = [
    (["box", "2x3"], box((2, 3))),
    (["cross", "3x3x3"], cross(3, ndim=3)),
    (["cross", "5"], cross(5, ndim=1)),
    (["diamond", "5x5"], diamond(5, ndim=2)),
    (["diamond", "5x5", "--radius", "1"], diamond(5, ndim=2, radius=1)),
    (["ball", "3x3x3", "--radius", "1.5"], ball(3, ndim=3, radius=1.5)),
    (["ball", "3x5", "--spacing", "2,1"], ball((3, 5), spacing=(2, 1))),
    (["ball", "3x5", "--spacing", "2", "--radius", "2"], ball((3, 5), radius=2, spacing=2)),
    (["hexagonal", "5"], hexagonal(5)),
    (["hexagonal", "3x3"], hexagonal(3)),
    (["causal", "5x5"], causal(5, ndim=2)),
    (["causal", "3x3x3", "--kind", "B"], causal(3, ndim=3, kind="B")),
    (["dilated", "3x3", "--dilation", "2"], dilated(3, 2, ndim=2)),
    (["dilated", "2x3", "--dilation", "3x1"], dilated((2, 3), (3, 1))),
    (["blind_spot", "5x5"], blind_spot(5, ndim=2)),
    (["blind_spot", "5x5", "--radius", "1"], blind_spot(5, ndim=2, radius=1)),
    (["blind_spot", "3x3", "--radius", "0"], blind_spot(3, ndim=2, radius=0)),
    (["line", "3x5", "--axis", "0"], line((3, 5), 0)),
    (["line", "3x5", "--axis", "-1"], line((3, 5), -1)),
    (
        ["random", "4x6", "--density", "0.25"],
        random((4, 6), 0.25, generator=torch.Generator().manual_seed(0)),
    ),
    (
        ["random", "4x6", "--density", "0.5", "--seed", "3"],
        random((4, 6), 0.5, generator=torch.Generator().manual_seed(3)),
    ),
]


@pytest.mark.parametrize(("argv", "expected"), SHOWN, ids=[" ".join(a) for a, _ in SHOWN])
def test_cli_show_prints_text_and_tap_count(
    argv: list[str], expected: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", *argv]) == 0
    taps = f"{int(expected.sum())} of {expected.numel()} taps"
    assert capsys.readouterr().out == f"{to_text(expected)}\n{taps}\n"


def test_cli_show_cross_3x3x3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "cross", "3x3x3"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n7 of 27 taps\n")
    assert out.count("###") == 1


@pytest.mark.parametrize("interleaved", [[], ["--interleaved"]])
def test_cli_show_causal_channel_groups(
    interleaved: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["show", "causal", "3x3", "--in-channels", "6", "--out-channels", "2"]
    assert main([*argv, "--channel-groups", "2", *interleaved]) == 0
    mask = causal(
        3, ndim=2, in_channels=6, out_channels=2, channel_groups=2, interleaved=bool(interleaved)
    )
    blocks = capsys.readouterr().out.split("\n\n")
    assert len(blocks) == 12
    assert blocks[0] == f"out 0, in 0:\n{to_text(mask[0, 0])}"
    assert blocks[-1] == f"out 1, in 5:\n{to_text(mask[1, 5])}\n{int(mask.sum())} of 108 taps\n"
    assert blocks[7] == f"out 1, in 1:\n{to_text(mask[1, 1])}"


def test_cli_show_labels_the_blocks_of_a_4d_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "causal", "3x3x3x3", "--kind", "B"]) == 0
    mask = causal(3, ndim=4, kind="B")
    expected = "\n\n".join(f"[{i}]:\n{to_text(mask[i])}" for i in range(3))
    assert capsys.readouterr().out == f"{expected}\n41 of 81 taps\n"


def test_cli_show_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cross.png"
    assert main(["show", "cross", "3x3x3", "--png", str(path)]) == 0
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert path.stat().st_size > 1000
    assert capsys.readouterr().out == f"wrote {path}: cross 3x3x3: 7 of 27 taps\n"
    assert not plt.get_fignums()  # the figure is closed again


@pytest.mark.slow  # a fresh process importing torch and matplotlib
def test_cli_show_png_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "ball.png"
    result = subprocess.run(
        [sys.executable, "-m", "maskparam", "show", "ball", "5x5x5", "--png", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "33 of 125 taps" in result.stdout
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_show_png_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_matplotlib(monkeypatch)
    path = tmp_path / "cross.png"
    assert main(["show", "cross", "3x3", "--png", str(path)]) == 1
    assert 'pip install "maskparam[plot]"' in capsys.readouterr().err
    assert not path.exists()


def test_cli_show_png_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing" / "cross.png"
    assert main(["show", "cross", "3x3", "--png", str(path)]) == 1
    assert f"cannot write {path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "plus", "3x3"], "argument FACTORY: invalid choice: 'plus'"),
        (["show", "cross"], "the following arguments are required: SIZE"),
        (["show", "cross", "3xa"], "argument SIZE: expected sizes such as 3x3x3 or 5. Got '3xa'"),
        (
            ["show", "ball", "3x3", "--spacing", "a"],
            "argument --spacing: expected numbers such as 2.5,0.7,0.7. Got 'a'.",
        ),
        (["show", "causal", "3x3", "--kind", "C"], "argument --kind: invalid choice: 'C'"),
        (["show", "cross", "3x3", "--radius", "1"], "cross takes no options. Got --radius."),
        (
            ["show", "ball", "3x3", "--axis", "0", "--seed", "1"],
            "ball takes --radius, --spacing. Got --axis, --seed.",
        ),
        (
            ["show", "diamond", "3x3", "--interleaved"],
            "diamond takes --radius. Got --interleaved.",
        ),
        (["show", "dilated", "3x3"], "dilated needs --dilation."),
        (["show", "line", "3x3"], "line needs --axis."),
        (["show", "random", "3x3"], "random needs --density."),
        (["show", "cross", "4x4"], "cross needs an odd kernel size along every axis"),
        (["show", "hexagonal", "3x5"], "hexagonal needs a square 2-D kernel"),
        (["show", "line", "3x3", "--axis", "2"], "line expects an axis in [-2, 1]"),
        (["show", "random", "3x3", "--density", "2"], "random expects a density in [0, 1]"),
        (
            ["show", "causal", "3x3", "--in-channels", "3", "--out-channels", "3", "--png", "x"],
            "--png draws masks of 1 to 3 dims. Got shape=(3, 3, 3, 3): drop --png to print",
        ),
        (
            ["show", "causal", "3x3x3x3", "--png", "x"],
            "--png draws masks of 1 to 3 dims. Got shape=(3, 3, 3, 3): drop --png to print",
        ),
        (
            ["show", "causal", "3x3x3x3", "--in-channels", "3", "--out-channels", "3"],
            "to_text writes masks of 1 to 3 dims",
        ),
        (
            ["show", "causal", "3x3", "--in-channels", "3"],
            "causal's channel-group form needs both in_channels and out_channels.",
        ),
    ],
)
def test_cli_show_exception(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m maskparam show")
    assert f"python -m maskparam show: error: {message}" in err


def test_cli_show_checkerboard(capsys: pytest.CaptureFixture[str]) -> None:
    from maskparam.masks import checkerboard

    assert main(["show", "checkerboard", "5x5"]) == 0
    expected = checkerboard(5, ndim=2)
    assert capsys.readouterr().out == f"{to_text(expected)}\n12 of 25 taps\n"
    assert main(["show", "checkerboard", "3x3x3"]) == 0
    assert capsys.readouterr().out.endswith("\n14 of 27 taps\n")


def test_exception_cli_show_checkerboard(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["show", "checkerboard", "4x4"])
    assert info.value.code == 2
    assert "checkerboard needs an odd kernel size along every axis" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["show", "checkerboard", "5x5", "--radius", "1"])
    assert "checkerboard takes no options. Got --radius." in capsys.readouterr().err
