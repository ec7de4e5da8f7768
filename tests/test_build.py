"""Finding, building and trusting the tap kernel: the environment, the ISA, the cache."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from maskparam.apply import apply_mask
from maskparam.taps import build
from maskparam.taps import kernel as tap_kernel
from tests.tap_helpers import cross3d

NATIVE = tap_kernel.isa()
needs_kernel = pytest.mark.skipif(
    NATIVE is None, reason=f"no tap kernel here: {tap_kernel.status()}"
)
FOREIGN_UID = 4242


@pytest.fixture(autouse=True)
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test loads the kernel as a new process would; the next test, as before."""
    for name in ("MASKPARAM_TAP_KERNEL", "MASKPARAM_TAP_ISA", "CC"):
        monkeypatch.delenv(name, raising=False)
    tap_kernel.clear()
    yield
    monkeypatch.undo()
    tap_kernel.clear()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, not yet created."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MASKPARAM_CACHE_DIR", str(folder))
    return folder


def a_kernel_layer_matches_dense() -> bool:
    """Whether a masked layer, run by the kernel, gives dense's output."""
    torch.manual_seed(0)
    dense = apply_mask(nn.Conv3d(2, 8, 3, padding=1), cross3d())
    tapped = apply_mask(nn.Conv3d(2, 8, 3, padding=1), cross3d(), execution="taps")
    tapped.load_state_dict(dense.state_dict())
    x = torch.randn(1, 2, 4, 5, 6)
    return torch.allclose(dense(x), tapped(x), rtol=1e-4, atol=1e-5)


def status_in_a_new_process() -> str:
    """What a new process says (this one keeps every library it loaded, by path)."""
    code = "from maskparam.taps import kernel; print(kernel.status())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return done.stdout.strip()


def only_the_library(folder: Path) -> list[str]:
    """The folder's files, but for the kernel's tuning (see maskparam.taps.tune)."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("tune-"))


# -- the environment ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "Off", " off "])
def test_switch_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKPARAM_TAP_KERNEL", value)
    assert tap_kernel.library() is None
    assert tap_kernel.status() == f"MASKPARAM_TAP_KERNEL={value} turns it off"


@needs_kernel
@pytest.mark.parametrize("value", ["1", "true", "True", "yes", "ON", ""])
def test_switch_on(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKPARAM_TAP_KERNEL", value)
    assert tap_kernel.status() == f"ready ({NATIVE})"


@needs_kernel
@pytest.mark.parametrize("name", ["MASKPARAM_TAP_KERNEL", "MASKPARAM_TAP_ISA"])
def test_exception_an_unknown_value_warns_once_and_is_ignored(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, "maybe")
    with pytest.warns(RuntimeWarning, match=f"{name} takes one of .*got 'maybe'") as record:
        tap_kernel.library()
    assert len(record) == 1
    assert tap_kernel.status() == f"ready ({NATIVE})"


# -- the instruction set ----------------------------------------------------------------------


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, machine: str, flags: set[str]) -> None:
    monkeypatch.setattr(build.platform, "machine", lambda: machine)
    monkeypatch.setattr(build, "cpu_flags", lambda: flags)


@needs_kernel
@pytest.mark.skipif(NATIVE not in ("avx512", "avx2"), reason="an x86-64 test")
@pytest.mark.parametrize("isa", ["avx2", "AVX512"])
def test_forced_isa(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if isa.lower() == "avx512" and NATIVE != "avx512":
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("MASKPARAM_TAP_ISA", isa)
    assert tap_kernel.status() == f"ready ({isa.lower()})"
    assert tap_kernel.sizes()["lanes"] == {"avx2": 8, "avx512": 16}[isa.lower()]
    assert tap_kernel.cache_path().name.startswith(f"tapconv-{isa.lower()}-")
    assert a_kernel_layer_matches_dense()


def test_exception_a_forced_isa_the_cpu_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cpu(monkeypatch, "x86_64", {"sse2", "avx", "avx2", "fma"})
    monkeypatch.setenv("MASKPARAM_TAP_ISA", "avx512")
    assert tap_kernel.library() is None
    assert tap_kernel.status() == (
        "MASKPARAM_TAP_ISA=avx512 asks for an instruction set this CPU lacks "
        "(no avx512f among its flags)"
    )
    with pytest.raises(RuntimeError, match="no tap kernel can be built here"):
        tap_kernel.cache_path()
    # and the layers run all the same, in boxes
    layer = apply_mask(nn.Conv3d(2, 4, 3, padding=1), cross3d(), execution="taps")
    assert layer(torch.randn(1, 2, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


def test_exception_a_forced_isa_of_another_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cpu(monkeypatch, "x86_64", {"avx2", "fma", "avx512f"})
    monkeypatch.setenv("MASKPARAM_TAP_ISA", "neon")
    assert tap_kernel.status() == (
        "MASKPARAM_TAP_ISA=neon asks for an instruction set that x86_64 CPUs lack"
    )


@pytest.mark.parametrize(
    ("machine", "flags", "chosen"),
    [
        ("x86_64", {"avx2", "fma", "avx512f"}, "avx512"),
        ("x86_64", {"avx2", "fma"}, "avx2"),
        ("aarch64", {"fp", "asimd"}, "neon"),
    ],
)
def test_the_best_isa_of_the_cpu(
    machine: str, flags: set[str], chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend_cpu(monkeypatch, machine, flags)
    assert tap_kernel.PLUGIN.choose_isa() == chosen


@pytest.mark.parametrize(
    ("machine", "flags", "why"),
    [
        ("x86_64", {"avx", "fma"}, "it needs a CPU with AVX-512 or AVX2 and FMA"),
        ("riscv64", set(), "it needs an x86-64 or ARM64 CPU, not riscv64"),
    ],
)
def test_exception_no_isa(
    machine: str, flags: set[str], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend_cpu(monkeypatch, machine, flags)
    assert tap_kernel.status() == why


# -- the cache --------------------------------------------------------------------------------


@needs_kernel
def test_cache_folder_is_created_private(cache: Path) -> None:
    assert tap_kernel.status() == f"ready ({NATIVE})"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert only_the_library(cache) == [tap_kernel.cache_path().name]
    assert stat.S_IMODE(tap_kernel.cache_path().stat().st_mode) == 0o700


def build_elsewhere(path: Path, *flags: str, source: str | None = None) -> None:
    """A library at ``path``, built outside the loader: of ``source``, else of the kernel's."""
    with tempfile.TemporaryDirectory() as scratch:
        src = Path(scratch) / "lib.c"
        if source is None:
            shutil.copy(tap_kernel.PLUGIN.source, src)
        else:
            src.write_text(source)
        for part in tap_kernel.PLUGIN.includes:  # the files it includes, beside it
            shutil.copy(part, Path(scratch) / part.name)
        isa = tap_kernel.PLUGIN.choose_isa()
        command = ["cc", *build.FLAGS, *build.ISAS[isa][1], *flags, "-o"]
        subprocess.run([*command, str(path), str(src)], check=True, timeout=120)
    os.chmod(path, 0o700)


@needs_kernel
@pytest.mark.parametrize(
    ("planted", "why"),
    [
        ("garbage", "does not load"),
        # These two compile a library to plant before the real one: the slow tier.
        pytest.param("no symbols", "lacks the symbol tap_build_key", marks=pytest.mark.slow),
        pytest.param("another key", "answers build key 0x2a, not", marks=pytest.mark.slow),
    ],
)
def test_a_bad_library_at_the_cached_path_is_rebuilt(planted: str, why: str, cache: Path) -> None:
    path = tap_kernel.cache_path()
    cache.mkdir(mode=0o700)
    if planted == "garbage":
        path.write_bytes(b"not a shared library")
        path.chmod(0o700)
    elif planted == "no symbols":
        build_elsewhere(path, source="int unrelated(void) { return 1; }\n")
    else:
        build_elsewhere(path, "-DTAP_BUILD_KEY=42")
    status = tap_kernel.status()
    assert status.startswith(f"ready ({NATIVE}; rebuilt {path.name}: the cached one {why}")
    assert a_kernel_layer_matches_dense()
    # The rebuilt one replaced it: the next process loads it as it is.
    assert only_the_library(cache) == [path.name]
    assert status_in_a_new_process() == f"ready ({NATIVE})"


def make_foreign(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``path`` belongs to another user: really, as root; else as far as the loader sees."""
    if os.geteuid() == 0:
        os.chown(path, FOREIGN_UID, -1)
        return
    real_stat, real_lstat = os.stat, os.lstat

    def foreign(result: os.stat_result) -> os.stat_result:
        fields = list(result)
        fields[stat.ST_UID] = FOREIGN_UID
        return os.stat_result(fields)

    def fake_stat(p: object, *args: object, **kwargs: object) -> os.stat_result:
        result = real_stat(p, *args, **kwargs)  # type: ignore[arg-type]
        return foreign(result) if Path(str(p)) == path else result

    def fake_lstat(p: object, *args: object, **kwargs: object) -> os.stat_result:
        result = real_lstat(p, *args, **kwargs)  # type: ignore[arg-type]
        return foreign(result) if Path(str(p)) == path else result

    monkeypatch.setattr(build.os, "stat", fake_stat)
    monkeypatch.setattr(build.os, "lstat", fake_lstat)


@needs_kernel
def test_a_library_of_another_user_is_not_loaded(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tap_kernel.cache_path()
    cache.mkdir(mode=0o700)
    # A library that would be loaded, but for its owner: a constructor that leaves a mark.
    marker = cache.parent / "constructor-ran"
    key = tap_kernel.PLUGIN.target().key
    source = tap_kernel.PLUGIN.source.read_text() + (
        "\n#include <stdio.h>\n__attribute__((constructor)) static void mark(void) {\n"
        f'    FILE* f = fopen("{marker}", "w"); if (f) fclose(f);\n}}\n'
    )
    build_elsewhere(path, f"-DTAP_BUILD_KEY={key:#x}ULL", source=source)
    make_foreign(path, monkeypatch)
    status = tap_kernel.status()
    assert status.startswith(
        f"ready ({NATIVE}; rebuilt {path.name}: the cached one belongs to uid {FOREIGN_UID}, "
        "not to this user"
    )
    assert not marker.exists()
    assert a_kernel_layer_matches_dense()


@needs_kernel
def test_a_folder_of_another_user_is_not_used(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.mkdir(mode=0o700)
    make_foreign(cache, monkeypatch)
    status = tap_kernel.status()
    assert status.startswith(f"ready ({NATIVE}; built in a private temporary folder, since")
    assert f"the folder {cache} belongs to uid {FOREIGN_UID}" in status
    assert only_the_library(cache) == []
    assert a_kernel_layer_matches_dense()


@needs_kernel
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_folder_others_may_write_is_not_used(mode: int, cache: Path) -> None:
    cache.mkdir()
    cache.chmod(mode)
    status = tap_kernel.status()
    assert status == (
        f"ready ({NATIVE}; built in a private temporary folder, since the folder {cache} "
        f"is writable by its group or others (mode {mode:#o}))"
    )
    assert only_the_library(cache) == []
    assert a_kernel_layer_matches_dense()


@needs_kernel
def test_a_library_others_may_write_is_rebuilt(cache: Path) -> None:
    assert tap_kernel.status() == f"ready ({NATIVE})"
    path = tap_kernel.cache_path()
    path.chmod(0o722)
    assert status_in_a_new_process() == (
        f"ready ({NATIVE}; rebuilt {path.name}: the cached one is writable by its group or "
        "others (mode 0o722))"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert only_the_library(cache) == [path.name]


@needs_kernel
def test_a_symlink_at_the_cached_path_is_not_followed(cache: Path, tmp_path: Path) -> None:
    path = tap_kernel.cache_path()
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.so"
    build_elsewhere(elsewhere)
    path.symlink_to(elsewhere)
    assert "is not a plain file" in tap_kernel.status()
    assert not path.is_symlink()


@needs_kernel
def test_a_read_only_folder_is_not_written(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.mkdir(mode=0o700)
    cache.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the file system would
        real = tempfile.mkstemp

        def refuse(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:
            if Path(str(dir)) == cache:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)  # type: ignore[call-overload,no-any-return]

        monkeypatch.setattr(build.tempfile, "mkstemp", refuse)
    status = tap_kernel.status()
    assert status == (
        f"ready ({NATIVE}; built in a private temporary folder, since {cache} cannot be "
        "written (Permission denied))"
    )
    assert only_the_library(cache) == []
    assert a_kernel_layer_matches_dense()
    cache.chmod(0o700)


@needs_kernel
def test_exception_no_folder_can_be_written(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(build.tempfile, "mkstemp", refuse)
    assert tap_kernel.library() is None
    assert tap_kernel.status().endswith("cannot be written (Permission denied)")
    layer = apply_mask(nn.Conv3d(2, 4, 3, padding=1), cross3d(), execution="taps")
    assert layer(torch.randn(1, 2, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


@needs_kernel
def test_exception_a_compiler_that_builds_a_library_without_the_kernel(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-cc"
    fake.write_text(
        "#!/bin/sh\n# builds an empty library wherever -o says\n"
        'while [ "$1" != "-o" ]; do shift; done\n'
        'echo "int unrelated(void) { return 1; }" > "$2.c" && '
        'cc -shared -fPIC -o "$2" "$2.c"; status=$?; rm -f "$2.c"; exit $status\n'
    )
    fake.chmod(0o700)
    monkeypatch.setenv("CC", str(fake))
    assert tap_kernel.library() is None
    assert tap_kernel.status() == "the library just built lacks the symbol tap_build_key"
    assert only_the_library(cache) == []
    # and apply_mask works all the same: the boxes run it
    layer = apply_mask(nn.Conv3d(2, 4, 3, padding=1), cross3d(), execution="taps")
    assert layer(torch.randn(1, 2, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


def build_in_a_new_process(folder: str) -> tuple[str, bool]:
    os.environ["MASKPARAM_CACHE_DIR"] = folder
    return tap_kernel.status(), a_kernel_layer_matches_dense()


@pytest.mark.slow  # four fresh processes, each importing torch and building
@needs_kernel
def test_four_processes_building_at_once(cache: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(4) as pool:
        results = pool.map(build_in_a_new_process, [str(cache)] * 4)
    assert results == [(f"ready ({NATIVE})", True)] * 4
    assert only_the_library(cache) == [tap_kernel.cache_path().name]
    assert status_in_a_new_process() == f"ready ({NATIVE})"  # loads it as it is: whole


# -- building it ------------------------------------------------------------------------------


def _status_in_subprocess(env: dict[str, str]) -> str:
    code = "from maskparam.taps import kernel; print(kernel.status())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return done.stdout.strip()


def test_switched_off_by_the_environment() -> None:
    assert _status_in_subprocess({"MASKPARAM_TAP_KERNEL": "Off"}) == (
        "MASKPARAM_TAP_KERNEL=Off turns it off"
    )


@pytest.mark.slow  # two fresh processes, one of them building
@needs_kernel
def test_compiles_into_the_cache_folder(tmp_path: os.PathLike[str]) -> None:
    ready = f"ready ({tap_kernel.isa()})"
    assert _status_in_subprocess({"MASKPARAM_CACHE_DIR": str(tmp_path)}) == ready
    built = list(os.scandir(tmp_path))
    assert [entry.name.startswith(f"tapconv-{tap_kernel.isa()}-") for entry in built] == [True]
    # Built once: a second process loads it as it is.
    mtime = built[0].stat().st_mtime_ns
    assert _status_in_subprocess({"MASKPARAM_CACHE_DIR": str(tmp_path)}) == ready
    assert os.stat(built[0].path).st_mtime_ns == mtime


@needs_kernel
def test_a_failing_compiler_is_a_reason_not_an_error(tmp_path: os.PathLike[str]) -> None:
    why = _status_in_subprocess({"MASKPARAM_CACHE_DIR": str(tmp_path), "CC": "false"})
    assert why.startswith("false failed to compile it")
    assert list(os.scandir(tmp_path)) == []  # no half-written library left behind


def test_a_missing_compiler_is_a_reason_not_an_error(tmp_path: os.PathLike[str]) -> None:
    why = _status_in_subprocess(
        {"MASKPARAM_CACHE_DIR": str(tmp_path), "CC": "no-such-compiler-here"}
    )
    assert why in (
        "no C compiler found (set CC to one)",
        "it needs a CPU with AVX-512 or AVX2 and FMA",
    ) or why.startswith("it needs an x86-64 or ARM64 CPU")


def test_a_missing_source_is_a_reason_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    missing = build.Plugin(Path(tmp_path) / "missing.c", "tapconv", "tap", (), lambda lib: None)
    monkeypatch.setattr(tap_kernel, "PLUGIN", missing)
    monkeypatch.setenv("MASKPARAM_CACHE_DIR", str(tmp_path))
    assert tap_kernel.library() is None
    assert not tap_kernel.status().startswith("ready")
    layer = apply_mask(nn.Conv3d(2, 4, 3, padding=1), cross3d(), execution="taps")
    assert layer(torch.randn(1, 2, 4, 4, 4)).shape == (1, 4, 4, 4, 4)


def test_masked_layer_works_where_the_kernel_cannot_be_built(tmp_path: os.PathLike[str]) -> None:
    code = (
        "import torch, warnings; from torch import nn; from maskparam import apply_mask\n"
        "from maskparam.taps import kernel as tap_kernel\n"
        "import copy\n"
        "conv = nn.Conv3d(2, 3, 3, padding=1); dense = copy.deepcopy(conv)\n"
        "m = torch.zeros(3, 3, 3, dtype=torch.bool); m[1, 1, :] = m[1, :, 1] = m[:, 1, 1] = True\n"
        "apply_mask(dense, m)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error'); apply_mask(conv, m, execution='taps')\n"
        "    x = torch.randn(1, 2, 4, 4, 4); torch.testing.assert_close(conv(x), dense(x))\n"
        "print(tap_kernel.status())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MASKPARAM_CACHE_DIR": str(tmp_path), "CC": "false"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith("ready")
