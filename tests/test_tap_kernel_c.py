"""The C kernel on its own, per instruction set, against a naive conv (tests/c/test_tapconv.c).

Natively for each instruction set this CPU runs; for ARM64 NEON, cross-compiled and run under
qemu-aarch64 (tests/c/run_neon.sh), where the cross compiler and qemu are installed.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from maskparam.taps import build as tap_build

HARNESS = Path(__file__).with_name("c") / "test_tapconv.c"
NEON_SCRIPT = Path(__file__).with_name("c") / "run_neon.sh"


@pytest.mark.parametrize(
    ("isa", "optimize"),
    [
        ("avx512", ()),
        ("avx2", ()),
        ("neon", ()),
        ("avx512", ("-O0",)),
        ("avx2", ("-O0",)),
        ("avx512", ("-DKC=4",)),
        ("avx2", ("-DKC=4",)),
    ],
    ids=["avx512", "avx2", "neon", "avx512-O0", "avx2-O0", "avx512-KC4", "avx2-KC4"],
)
def test_kernel_matches_naive_conv(isa: str, optimize: tuple[str, ...], tmp_path: Path) -> None:
    """Built as maskparam builds it; at -O0, where nothing is inlined but what must be; and
    with chunks of 4 pairs (KC), so that the forward crosses chunk boundaries often."""
    machine = platform.machine().lower()
    native = isa in tap_build.MACHINE_ISAS.get(machine, ())
    if native:
        needs = tap_build.ISAS[isa][0]
        if not set(needs) <= tap_build.cpu_flags():
            pytest.skip(f"this CPU lacks {isa}")
        compiler = shutil.which("cc")
        if compiler is None:
            pytest.skip("no C compiler")
        flags = [f for f in tap_build.FLAGS if f not in ("-shared", "-fPIC")]
        binary = tmp_path / "test_tapconv"
        build = [compiler, *flags, *optimize, *tap_build.ISAS[isa][1], "-Wall", "-Werror", "-o"]
        subprocess.run([*build, str(binary), str(HARNESS), "-lm"], check=True, timeout=120)
        command = [str(binary)]
    elif isa == "neon":
        if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
            pytest.skip(
                "no aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install "
                "gcc-aarch64-linux-gnu qemu-user)"
            )
        command = ["sh", str(NEON_SCRIPT)]
    else:
        pytest.skip(f"{isa} is not for {machine}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   {isa} " in done.stdout
    assert "all cases match" in done.stdout
