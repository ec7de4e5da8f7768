"""Shared fixtures and hypothesis profiles.

Profiles: ``dev`` (default, fast) and ``ci`` (more examples, no deadline); pick one with
``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from maskparam.taps import paths

settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device: CPU always, CUDA when present (skipped cleanly without one)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The dtypes exact-gradient tests run in."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Forget compiled code after each test: tests compile the same functions many times,
    with other guards each, and dynamo compiles one function at most 8 times."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture
def box_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the boxes path, so a test knows it did not fall back to dense."""
    calls: list[int] = []
    real = paths.run_boxes

    def counted(*args: object) -> torch.Tensor:
        calls.append(len(args[4]))  # type: ignore[arg-type]
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(paths, "run_boxes", counted)
    return calls
