"""The choice of path (maskparam.taps.choose), explain(), and the calls torch makes odd."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from maskparam import taps
from maskparam.apply import apply_mask
from maskparam.masks import cross
from maskparam.taps import choose, paths
from maskparam.taps import kernel as tap_kernel
from maskparam.taps.choose import RULES

PLUS = cross(3, ndim=2)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning"),
]


def tapped(layer: nn.Module, execution: str = "taps", mask: torch.Tensor = PLUS) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return apply_mask(layer, mask, execution=execution)  # type: ignore[arg-type]


def test_rules_are_named_once_and_lead_to_known_paths() -> None:
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    assert {rule.path for rule in RULES} == set(paths.PATHS)
    assert RULES[-1].holds(None)  # type: ignore[arg-type]  # the last always holds
    assert all(rule.path == "dense" for rule in RULES if rule.warns)


@pytest.mark.parametrize(
    ("make", "x", "path", "rule"),
    [
        (lambda: nn.Conv2d(2, 2, 3, padding=1), torch.randn(1, 2, 5, 5), "kernel", "kernel"),
        (
            lambda: nn.Conv2d(2, 2, 3, padding=1, stride=2),
            torch.randn(1, 2, 6, 6),
            "fused",
            "CPU",
        ),
        (
            lambda: nn.Conv2d(2, 2, 3, padding=1).double(),
            torch.randn(1, 2, 5, 5, dtype=torch.float64),
            "fused",
            "CPU",
        ),
        (
            lambda: nn.Conv2d(2, 2, 3, padding=1),
            torch.zeros(1, 2, 5, 5, dtype=torch.int64),
            "dense",
            "dtype",
        ),
        (lambda: nn.Conv2d(0, 2, 3, padding=1), torch.randn(1, 0, 5, 5), "dense", "empty"),
    ],
    ids=["kernel", "stride", "float64", "integer", "no-input-channels"],
)
def test_explain_names_the_path_and_the_rule(
    make: object, x: torch.Tensor, path: str, rule: str
) -> None:
    layer = tapped(make())  # type: ignore[operator]
    if path == "kernel" and tap_kernel.library() is None:
        path, rule = "fused", "CPU"
    explained = taps.explain(layer, x)
    assert (explained.path, explained.rule) == (path, rule)
    assert str(explained).startswith(f"{path}: ")
    reason = next(r for r in RULES if r.name == rule).why
    assert explained.reason == reason(choose.Call(layer, x, layer.weight, layer.bias))


def test_explain_agrees_with_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    real = paths.run

    def spy(path: str, *args: object) -> torch.Tensor:
        ran.append(path)
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(paths, "run", spy)
    for layer, x in [
        (tapped(nn.Conv3d(2, 3, 3, padding=1), mask=cross(3, ndim=3)), torch.randn(1, 2, 4, 4, 4)),
        (tapped(nn.Conv2d(2, 3, 3, stride=2)), torch.randn(2, 2, 7, 7)),
        (tapped(nn.Conv1d(2, 3, 3), mask=torch.tensor([1, 0, 1])), torch.randn(2, 9)),
    ]:
        expected = taps.explain(layer, x).path
        layer(x)
        assert ran.pop() == expected


def test_explain_other_layers() -> None:
    x = torch.randn(1, 2, 5, 5)
    assert taps.explain(nn.Conv2d(2, 2, 3), x).rule == "execution"
    assert taps.explain(apply_mask(nn.Conv2d(2, 2, 3), PLUS), x).path == "dense"
    partial = apply_mask(nn.Conv2d(2, 2, 3), PLUS, bias_mode="partial")
    assert str(taps.explain(partial, x)) == (
        "dense: bias_mode='partial' runs its own convolutions"
    )


def test_explain_under_forward_ad_and_auto() -> None:
    layer = tapped(nn.Conv2d(2, 2, 3, padding=1, stride=2))
    x = torch.randn(1, 2, 6, 6)
    with fwAD.dual_level():
        assert taps.explain(layer, x).rule == "forward AD"
    auto = tapped(nn.Conv1d(2, 2, 5), "auto", mask=torch.tensor([1, 1, 1, 1, 0]))
    assert taps.explain(auto, torch.randn(1, 2, 9)).rule == "auto: dense"


# -- torch.jit.trace, torch.onnx.export and torch.export: what they record ---------------------


@pytest.mark.parametrize("execution", ["taps", "auto"])
def test_jit_trace_records_the_dense_convolution(execution: str) -> None:
    plain = nn.Conv3d(2, 3, 3, padding=1)
    dense = apply_mask(copy.deepcopy(plain), cross(3, ndim=3))
    layer = tapped(plain, execution, mask=cross(3, ndim=3))
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(1, 2, 4, 4, 4)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
    y = torch.randn(2, 2, 5, 4, 3)  # another shape: the trace holds no boxes of the first
    torch.testing.assert_close(traced(y), nn.Sequential(dense, nn.ReLU())(y))


@pytest.mark.parametrize("execution", ["taps", "auto"])
def test_onnx_export_records_the_dense_convolution(
    execution: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = tapped(nn.Conv2d(2, 3, 3, padding=1), execution)
    x = torch.randn(1, 2, 5, 5)
    with monkeypatch.context() as patch:  # what the TorchScript exporter says while it runs
        patch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        assert taps.explain(layer, x).rule == "tracing"
    pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(layer, (x,), buffer, dynamo=False)  # TorchScript: traces
    assert buffer.getvalue()
    pytest.importorskip("onnxscript")
    assert torch.onnx.export(layer, (x,), dynamo=True) is not None  # torch.export


@pytest.mark.parametrize("execution", ["taps", "auto"])
def test_torch_export_records_ordinary_operations(execution: str) -> None:
    # Not the tap kernel's custom op, which only a process with maskparam loaded can run.
    layer = tapped(nn.Conv2d(2, 3, 3, padding=1), execution)
    x = torch.randn(1, 2, 5, 5)
    layer(x)
    exported = torch.export.export(layer, (x,))
    assert "tap_conv" not in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), layer(x))


# -- a conv with no input channels -------------------------------------------------------------


@pytest.mark.parametrize("execution", ["dense", "taps", "auto"])
@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel", "valid", "partial"])
def test_no_input_channels_runs_as_the_plain_conv(execution: str, bias_mode: str) -> None:
    plain = nn.Conv2d(0, 3, 3, padding=1)
    x = torch.randn(2, 0, 5, 5)
    expected = plain(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # taps with a data bias mode runs dense
        layer = apply_mask(copy.deepcopy(plain), PLUS, execution=execution, bias_mode=bias_mode)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning in the forward
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
