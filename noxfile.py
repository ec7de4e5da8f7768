"""Sessions for tests, lint, typing, the demo and the docs: ``nox -l`` lists them."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint", "typing"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
# The torch that sessions install. The default is the tested floor, a CPU wheel; set
# MASKPARAM_TORCH (for example "torch==2.14.1") to run against another release.
TORCH = os.environ.get("MASKPARAM_TORCH", "torch==2.13.0")


def _install(session: nox.Session, *groups: str) -> None:
    session.install(TORCH)
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))
    session.install("-e", ".")


def _quiet_openmp(session: nox.Session) -> None:
    # Idle OpenMP threads sleep rather than spin. On a busy machine, spinning threads take the
    # cores from the thread that has work, and tests of many tiny calls (gradcheck) then run
    # tens of times slower; what the tests check does not change.
    session.env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the fast tier: every test not marked slow, and the doctests (hypothesis "dev")."""
    _install(session, "test")
    _quiet_openmp(session)
    session.env.setdefault("HYPOTHESIS_PROFILE", os.environ.get("HYPOTHESIS_PROFILE", "dev"))
    # A later -m in the arguments wins: `nox -s tests -- -m slow` runs only the slow tier.
    session.run("pytest", "-m", "not slow", *session.posargs)


# The share of maskparam's lines that tests_full must run, in percent: the measured figure
# rounded down (0.1.0 ran 98.0% of its lines; hypothesis's draws move the figure by a few
# lines from run to run), so that a change which leaves code untested fails CI. Raise it when
# coverage rises.
COVERAGE_FLOOR = 98


@nox.session
def tests_full(session: nox.Session) -> None:
    """Run every test, slow ones included, with hypothesis "ci" and a coverage floor (CI)."""
    _install(session, "test", "coverage")
    _quiet_openmp(session)
    session.env["HYPOTHESIS_PROFILE"] = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    cov = ["--cov=maskparam", "--cov-report=term", f"--cov-fail-under={COVERAGE_FLOOR}"]
    session.run("pytest", *cov, *session.posargs)


# The integration session's stack, pinned so that a new release of any of them changes CI
# only when this list changes. torchvision's wheels are built against one torch release, so
# the session brings its own torch, whatever MASKPARAM_TORCH says.
INTEGRATION = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "monai==1.6.1",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "onnxruntime==1.32.0",
    "onnxscript==0.7.2",
]


@nox.session
def integration(session: nox.Session) -> None:
    """Mask torchvision, timm and MONAI models and export them to ONNX (tests/integration)."""
    test = nox.project.dependency_groups(PYPROJECT, "test")
    session.install(*INTEGRATION, *test)
    session.install("-e", ".")
    # tests/integration is collected only with this set (tests/integration/conftest.py),
    # so the tests session never needs these packages.
    session.env["MASKPARAM_INTEGRATION"] = "1"
    session.run("pytest", "tests/integration", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """Type-check the package with mypy in strict mode."""
    _install(session, "typing")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo: a cross-masked Conv3d learns a hidden cross filter."""
    session.install(TORCH, "numpy")  # numpy only keeps torch's import quiet
    session.install(".")
    session.run("python", "-m", "maskparam", "demo")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation offline, warnings as errors, into docs/_build/html."""
    _install(session, "docs")
    build = ["-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"]
    session.run("sphinx-build", *build, *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks (benchmarks/bench.py; pass options after --, e.g. -- --quick)."""
    session.install(TORCH, "numpy")  # numpy only keeps torch's import quiet
    session.install(".")
    session.run("python", "benchmarks/bench.py", *session.posargs)
