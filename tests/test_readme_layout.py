"""The README's "Layout" section lists every module and folder of the package, and no other.

A module added, moved or removed without the README following fails here, naming the entry.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskparam"
SOURCES = {".py", ".c"}  # what counts as a module; __init__.py and py.typed need no entry


def layout_block() -> str:
    """The fenced block under the README's "## Layout" heading."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section is not None, 'README.md has no "## Layout" section'
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.M | re.S)
    assert block is not None, 'the "Layout" section has no fenced block'
    return block.group(1)


def listed(block: str) -> tuple[set[str], set[str]]:
    """The package's entries as paths under maskparam/ ("taps/", "taps/plan.py"), and the
    top-level entries of the repository ("tests/")."""
    inside: set[str] = set()
    top: set[str] = set()
    parents: list[tuple[int, str]] = []  # (indent, folder path) of the folders still open
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = "".join(folder for _, folder in parents[1:]) + name
        if not parents:
            top.add(name)
        else:
            assert parents[0][1] == "maskparam/", f"{name!r} is indented under {parents[0][1]}"
            inside.add(path)
        if name.endswith("/"):
            parents.append((indent, name))
    return inside, top


def in_tree() -> set[str]:
    """Every module and folder of the package, as paths under maskparam/."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*"):
        relative = path.relative_to(PACKAGE)
        if "__pycache__" in relative.parts:
            continue
        if path.is_dir():
            found.add(f"{relative.as_posix()}/")
        elif path.suffix in SOURCES and path.name != "__init__.py":
            found.add(relative.as_posix())
    return found


def test_every_module_and_folder_is_listed() -> None:
    inside, _ = listed(layout_block())
    missing = ", ".join(f"maskparam/{p}" for p in sorted(in_tree() - inside))
    assert not missing, f"README.md's Layout does not list {missing}"


def test_every_listed_entry_exists() -> None:
    inside, top = listed(layout_block())
    gone = ", ".join(f"maskparam/{p}" for p in sorted(inside - in_tree()))
    assert not gone, f"README.md's Layout lists {gone}, which the tree lacks"
    assert "maskparam/" in top
    absent = sorted(name for name in top if not (ROOT / name).exists())
    assert not absent, f"README.md's Layout lists {absent}, which the repository lacks"


def test_the_parser_reads_nesting() -> None:
    block = "pkg/\nmaskparam/\n  a.py   x\n  sub/   y\n    b.py z\n  c.py\nother/  w\n"
    inside, top = listed(block)
    assert inside == {"a.py", "sub/", "sub/b.py", "c.py"}
    assert top == {"pkg/", "maskparam/", "other/"}
