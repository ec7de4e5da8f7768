"""Every code example in docs/ and in the README runs, page by page, as the reader sees it.

Each page's fenced blocks run in order, in one fresh namespace per page, in a temporary
working directory. What a block's language means:

- ``python``: executed.
- ``pycon``: a doctest; the outputs shown are checked.
- ``{code-figure}``: executed, as the docs build does (see ``docs/_ext/code_figure.py``).
- ``{code-block} python`` with ``:caption: NAME.py``: a script file, written to the working
  directory when reached; a ``bash`` block then runs it.
- ``bash``: run when every command in it is ``python -m maskparam ...`` or
  ``torchrun ... NAME.py`` (the same Python runs them); any other command (an install, a
  ``nox`` session) makes the whole block one to read, never run.
- ``text`` and MyST directives other than the above: not code.

Any other language fails the test, so no example can slip through unrun.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import maskparam
from maskparam import masks

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(p for p in DOCS.rglob("*.md") if not {"_build", "_generated"} & set(p.parts))
# Pages whose examples take more than a few seconds: torch.compile with inductor, and
# torchrun with two processes.
SLOW = {"recipes/compile.md", "recipes/distributed.md"}
NOT_CODE = {"text", "{toctree}", "{eval-rst}", "{note}", "{warning}", "{tip}"}
RUNNABLE_COMMANDS = ("python -m maskparam ", "torchrun ")


@dataclass(frozen=True)
class Block:
    language: str  # the fence's info string, such as "python" or "{code-figure}"
    options: dict[str, str]  # MyST directive options (":caption: x.py")
    body: str
    line: int  # of the first line of the body, 1-based


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page (backticks or tildes, CommonMark-style)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*(.*)$", lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]
        ):
            body.append(lines[j])
            j += 1
        options: dict[str, str] = {}
        while body and (option := re.match(r"^:([\w-]+):\s*(.*)$", body[0])):
            options[option[1]] = option[2]
            body.pop(0)
        start = i + 2 + len(options)
        if options and body and not body[0].strip():
            body.pop(0)
            start += 1
        blocks.append(Block(info.strip(), options, "\n".join(body) + "\n", start))
        i = j + 1
    return blocks


def _script_name(block: Block) -> str | None:
    if block.language.split() == ["{code-block}", "python"]:
        return block.options.get("caption")
    return None


def _commands(block: Block) -> list[str] | None:
    """The commands of a bash block that the tests run, or None for a block only to read."""
    commands = [
        line.split("  #")[0].strip()
        for line in block.body.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    if commands and all(c.startswith(RUNNABLE_COMMANDS) for c in commands):
        return commands
    return None


def _run_command(command: str, cwd: Path, where: str) -> None:
    args = shlex.split(command)
    if args[0] == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    else:
        assert args[:3] == ["python", "-m", "maskparam"]
        args = [sys.executable, *args[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{where}: {command!r} failed:\n{done.stdout}\n{done.stderr}"


def run_page(path: Path, cwd: Path, *, strict: bool = True) -> None:
    """Run every code block of ``path`` in order, in one namespace, as the module says.

    ``strict=False`` (for the README, which is not written for these tests) lets blocks of
    other languages, or none, pass as text.
    """
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    for block in fenced_blocks(text):
        where = f"{name}:{block.line}"
        plt.close("all")
        if block.language in ("python", "{code-figure}"):
            code = compile(block.body, where, "exec")
            exec(code, namespace)
        elif block.language == "pycon":
            test = parser.get_doctest(block.body, namespace, where, str(path), block.line - 1)
            test.globs = namespace  # DocTest copies the globals; share the page's instead
            report: list[str] = []
            runner = doctest.DocTestRunner(optionflags=flags)
            result = runner.run(test, out=report.append, clear_globs=False)
            assert result.failed == 0, "".join(report)
        elif (script := _script_name(block)) is not None:
            (cwd / script).write_text(block.body, encoding="utf-8")
        elif block.language == "bash":
            for command in _commands(block) or []:
                _run_command(command, cwd, where)
        elif strict:
            assert block.language in NOT_CODE, (
                f"{where}: a block in {block.language!r}, which the docs tests do not know. "
                "Use python, pycon or {code-figure} for code, bash for commands, text for "
                "anything else."
            )
            assert "```" not in block.body, f"{where}: a code block nested in a directive."
    plt.close("all")


def _warnings_are_errors() -> None:
    """An example that warns is a bug in the example; torch's own deprecations are not."""
    warnings.simplefilter("error")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")


def _page_param(path: Path) -> Any:
    name = path.relative_to(DOCS).as_posix()
    marks = [pytest.mark.slow] if name in SLOW else []
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_page_param(p) for p in PAGES])
def test_docs_page_examples_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        _warnings_are_errors()
        run_page(path, tmp_path)


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert any(b.language == "python" for b in fenced_blocks(README.read_text("utf-8")))
    with warnings.catch_warnings():
        _warnings_are_errors()
        run_page(README, tmp_path, strict=False)


# -- what the pages must cover -----------------------------------------------------------


def test_every_page_is_in_a_toctree() -> None:
    index = (DOCS / "index.md").read_text("utf-8")
    listed = {
        line.strip()
        for block in fenced_blocks(index)
        if block.language == "{toctree}"
        for line in block.body.splitlines()
        if line.strip()
    }
    assert listed == {p.relative_to(DOCS).with_suffix("").as_posix() for p in PAGES} - {"index"}


def test_gallery_draws_every_mask_factory() -> None:
    blocks = fenced_blocks((DOCS / "gallery.md").read_text("utf-8"))
    code = "".join(b.body for b in blocks if b.language == "{code-figure}")
    assert all(b.language != "python" for b in blocks)  # Sphinx runs only code-figure
    missing = [name for name in masks.__all__ if f"masks.{name}(" not in code]
    assert not missing, f"the gallery does not show {missing}"


def test_pages_with_figures_have_no_plain_python_blocks() -> None:
    # Sphinx runs only the code-figure blocks; a plain block between them would run in the
    # tests and not in the build.
    for path in PAGES:
        languages = {b.language for b in fenced_blocks(path.read_text("utf-8"))}
        if "{code-figure}" in languages:
            assert not {"python", "pycon"} & languages, path.name


def _documented() -> set[str]:
    text = (DOCS / "api.md").read_text("utf-8")
    return set(re.findall(r"\.\. auto(?:function|class|data|module):: ([\w.]+)", text))


def test_api_reference_documents_every_public_name() -> None:
    documented = _documented()
    public = {f"maskparam.{name}" for name in maskparam.__all__ if name != "__version__"}
    missing = sorted(public - documented)
    assert not missing, f"docs/api.md does not document {missing}"
    assert "maskparam.masks" in documented


def test_api_reference_names_exist() -> None:
    for dotted in _documented():
        module, _, attribute = dotted.rpartition(".")
        target: Any = __import__(module, fromlist=["_"]) if module else None
        assert hasattr(target, attribute) or dotted == "maskparam.masks", dotted


# -- the harness itself ------------------------------------------------------------------


def test_fenced_blocks_reads_languages_options_and_lines() -> None:
    text = "\n".join(
        [
            "# Title",
            "```python",
            "x = 1",
            "```",
            "````{code-block} python",
            ":caption: run.py",
            "",
            "print(1)",
            "````",
            "~~~text",
            "```not a fence end```",
            "~~~",
        ]
    )
    blocks = fenced_blocks(text)
    assert [(b.language, b.options, b.body, b.line) for b in blocks] == [
        ("python", {}, "x = 1\n", 3),
        ("{code-block} python", {"caption": "run.py"}, "print(1)\n", 8),
        ("text", {}, "```not a fence end```\n", 11),
    ]


def test_run_page_reports_the_failing_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```pycon\n>>> x + 1\n3\n```\n", "utf-8")
    with pytest.raises(AssertionError, match=r"page.md:6(.|\n)*Expected:\s+3\s+Got:\s+2"):
        run_page(page, tmp_path)


def test_run_page_refuses_unknown_languages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```py\nx = 1\n```\n", "utf-8")
    with pytest.raises(AssertionError, match="which the docs tests do not know"):
        run_page(page, tmp_path)


def test_only_maskparam_and_torchrun_commands_run() -> None:
    def block(body: str) -> Block:
        return Block("bash", {}, body, 1)

    assert _commands(block("python -m maskparam show cross 3x3x3  # print it\n")) == [
        "python -m maskparam show cross 3x3x3"
    ]
    assert _commands(block("pip install .\npython -m maskparam demo\n")) is None
    assert _commands(block("# only a comment\n")) is None


# -- the code-figure directive of the docs build ----------------------------------------


def _build(folder: Path, page: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Build a one-page Sphinx project with the code-figure directive; exit code, stderr."""
    pytest.importorskip("myst_parser")
    build = pytest.importorskip("sphinx.cmd.build")
    source = folder / "source"
    source.mkdir()
    extensions = str(DOCS / "_ext")
    (source / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {extensions!r})\n"
        "extensions = ['myst_parser', 'code_figure']\n",
        "utf-8",
    )
    (source / "index.md").write_text(page, "utf-8")
    code = build.build_main(["-W", "-q", "-b", "html", str(source), str(folder / "html")])
    return code, capsys.readouterr().err


def test_code_figure_shows_the_code_and_embeds_each_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = (
        "# Page\n\n```{code-figure}\nimport matplotlib.pyplot as plt\nsize = 2\n```\n\n"
        "```{code-figure}\n:alt: two figures\n\nplt.subplots(figsize=(size, size))\n"
        "plt.subplots(figsize=(size, size))\n```\n"
    )
    code, errors = _build(tmp_path, page, capsys)
    assert code == 0, errors
    html = (tmp_path / "html" / "index.html").read_text("utf-8")
    assert html.count('alt="two figures"') == 2  # the second block's two figures
    assert "figsize" in html  # its code, shown above them
    assert sorted(p.name for p in (tmp_path / "source" / "_generated").iterdir()) == [
        "index-2-1.png",
        "index-2-2.png",
    ]
    assert plt.get_fignums() == []


def test_code_figure_that_raises_fails_the_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = "# Page\n\n```{code-figure}\nx = 1\n```\n\n```{code-figure}\nx / 0\n```\n"
    code, errors = _build(tmp_path, page, capsys)
    assert code != 0
    assert "code-figure 2 of index raised" in errors
    assert "ZeroDivisionError" in errors
