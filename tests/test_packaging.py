"""The distribution ships what its metadata declares: the licence text, in sdist and wheel;
the version has its changelog entry."""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

import maskparam
from maskparam.taps import kernel as tap_kernel

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The clauses that make a licence BSD-3-Clause rather than BSD-2 or MIT.
BSD3_CLAUSES = (
    "Redistributions of source code must retain the above copyright notice",
    "Redistributions in binary form must reproduce the above copyright notice",
    "Neither the name of the copyright holder nor the names of its",
    'THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"',
)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_license_file_matches_the_declared_licence() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    text = _words((ROOT / "LICENSE").read_text())
    assert text.startswith("BSD 3-Clause License Copyright (c) 2026, maskparam developers")
    for clause in BSD3_CLAUSES:
        assert _words(clause) in text
    assert project["authors"] == [{"name": "maskparam developers"}]


def test_license_file_is_in_the_sdist_include_list() -> None:
    assert "LICENSE" in PYPROJECT["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]


def test_the_changelog_has_a_dated_entry_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = re.escape(maskparam.__version__)
    assert re.search(rf"^## \[{version}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), version
    include = PYPROJECT["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    readme = (ROOT / "README.md").read_text()
    for page in ("CHANGELOG.md", "BENCHMARKS.md"):
        assert page in include
        assert f"]({page})" in readme, f"README.md does not link {page}"


@pytest.mark.slow
def test_built_wheel_and_sdist_hold_the_license(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = pytest.importorskip("hatchling.build", reason="building needs hatchling installed")
    monkeypatch.chdir(ROOT)  # PEP 517 hooks run in the project's root
    wheel = tmp_path / build.build_wheel(os.fspath(tmp_path))
    sdist = tmp_path / build.build_sdist(os.fspath(tmp_path))
    license_text = (ROOT / "LICENSE").read_text()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(licence) == 1, names
        assert archive.read(licence[0]).decode() == license_text
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    # the tap kernel's C sources, which it compiles at first use
    for source in (tap_kernel.PLUGIN.source, *tap_kernel.PLUGIN.includes):
        assert f"maskparam/taps/{source.name}" in names
    assert "License-Expression: BSD-3-Clause" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/LICENSE"))
        assert member.name.count("/") == 1  # at the sdist's root
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read().decode() == license_text
