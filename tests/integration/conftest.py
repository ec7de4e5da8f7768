"""Collect these tests only when ``MASKPARAM_INTEGRATION=1``, as the integration session sets it.

They need packages the main suite does not install (torchvision, timm, MONAI, ONNX), and a
torch that matches torchvision's build, so the ``tests`` session must not collect them; run
them with ``python -m nox -s integration``. Nothing is downloaded: every model is built with
random weights (``weights=None``, ``pretrained=False``).
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("MASKPARAM_INTEGRATION") != "1":
    # A glob, not a list of names, so that a new file here is never collected by accident.
    collect_ignore_glob = ["*"]
else:
    from architectures import ARCHITECTURES, Architecture

    # Module scope: tests that share a trained model (test_architectures.py) build it once.
    @pytest.fixture(scope="module", params=ARCHITECTURES, ids=lambda a: a.name)
    def arch(request: pytest.FixtureRequest) -> Architecture:
        return request.param
