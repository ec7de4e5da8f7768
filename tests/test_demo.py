"""The demo: a cross-masked Conv3d learns a hidden cross filter, and says whether it did."""

from __future__ import annotations

import subprocess
import sys

import pytest

from maskparam import demo
from maskparam.__main__ import main


def test_demo_passes_its_checks() -> None:
    lines: list[str] = []
    assert demo.run(log=lines.append) == 0
    text = "\n".join(lines)
    assert "largest |weight| at masked taps: 0.0" in text
    assert "largest |masked - baked| output difference: 0.0" in text
    assert "FAILED" not in text


def test_demo_reports_failure_with_nonzero_exit() -> None:
    lines: list[str] = []
    assert demo.run(steps=1, log=lines.append) == 1  # one step cannot fit the filter
    assert any("[FAILED] loss fell by 1000x" in line for line in lines)


@pytest.mark.slow  # a fresh process: torch's import and 150 training steps
def test_cli_demo_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "maskparam", "demo", "--steps", "150"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "loss before" in result.stdout


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
