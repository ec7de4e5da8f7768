"""What docs/recipes/deploying.md promises: ONNX in onnxruntime, TorchScript, the page's script.

ONNX with both of torch's exporters: the TorchScript-based one (``dynamo=False``) and the
dynamo one (``dynamo=True``, which needs onnxscript). A masked model running dense exports
``where(mask, original, 0)`` on constants: the TorchScript-based exporter folds it into the
conv weight; the dynamo one folds it only for small weights, and onnxruntime folds the rest
when it loads the model. Either way onnxruntime runs plain convolutions.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from architectures import Architecture
from onnx import numpy_helper
from torch import nn

import maskparam
from maskparam import apply_masks, masks, remove_masks

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
# onnxruntime's kernels sum in another order than torch's, more so for big reductions.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def export(model: nn.Module, x: torch.Tensor, path: Path, *, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        # The exporters' own chatter (deprecations, "the opset is lower than ...").
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"]
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto


def run(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, onnx.ModelProto]:
    """onnxruntime's output, and the graph it runs: after its own constant folding."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_suffix(".runtime.onnx"))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": x.numpy()})
    return torch.from_numpy(y), onnx.load(options.optimized_model_filepath)


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The graph's initializers and Constant nodes, by name."""
    found = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def conv_weights(proto: onnx.ModelProto) -> list[np.ndarray | None]:
    """The weight of each Conv and ConvTranspose node, or None where the graph computes it."""
    known = constants(proto)
    kinds = ("Conv", "ConvTranspose")
    return [known.get(n.input[1]) for n in proto.graph.node if n.op_type in kinds]


def masked_eval(arch: Architecture, **options: str) -> nn.Module:
    model = arch.fresh()
    assert len(apply_masks(model, arch.masks, **options)) == arch.masked
    return model.eval()


def assert_masked_zeros_in(proto: onnx.ModelProto, arch: Architecture) -> None:
    """Each masked layer is a conv whose weight is a constant, zero at the masked taps.

    Layers are matched by their zeros, not by order or values: an exporter or onnxruntime
    may fold batch norm into the conv weights, which scales each output channel.
    """
    weights = conv_weights(proto)
    assert all(w is not None for w in weights), "a conv weight is computed at run time"
    off = ~arch.mask.numpy()
    zeroed = [w for w in weights if w.shape[2:] == off.shape and not w[:, :, off].any()]
    assert len(zeroed) == arch.masked


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_baked(arch: Architecture, dynamo: bool, tmp_path: Path) -> None:
    model = masked_eval(arch)
    x = arch.input()
    with torch.no_grad():
        expected = model(x)
    remove_masks(model)
    proto = export(model, x, tmp_path / "baked.onnx", dynamo=dynamo)
    assert "Where" not in op_types(proto)
    assert_masked_zeros_in(proto, arch)
    out, _ = run(tmp_path / "baked.onnx", x)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_masked_dense(arch: Architecture, dynamo: bool, tmp_path: Path) -> None:
    model = masked_eval(arch, execution="dense")
    x = arch.input()
    with torch.no_grad():
        expected = model(x)
    proto = export(model, x, tmp_path / "masked.onnx", dynamo=dynamo)
    wheres = [node for node in proto.graph.node if node.op_type == "Where"]
    if not dynamo:
        assert wheres == []  # folded into the conv weights at export
    else:
        # onnxscript's optimizer folds a Where only up to a size (8192 elements in 0.7), so
        # the big weights stay where(mask, original, 0), on constants only.
        known = constants(proto)
        assert len(wheres) <= arch.masked
        assert all(name in known for node in wheres for name in node.input)
    out, runtime = run(tmp_path / "masked.onnx", x)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert "Where" not in op_types(runtime)  # what onnxruntime runs: plain convolutions
    assert_masked_zeros_in(runtime, arch)
    assert any(maskparam.is_masked(m) for m in model.modules())  # export changed nothing


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_masked_taps(dynamo: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    apply_masks(model, masks.cross(3, ndim=2), include=nn.Conv2d, execution="taps")
    model.eval()
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        expected = model(x)
    export(model, x, tmp_path / "taps.onnx", dynamo=dynamo)
    out, _ = run(tmp_path / "taps.onnx", x)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias_mode", ["valid", "partial"])
def test_export_bias_mode(bias_mode: str, dynamo: bool, tmp_path: Path) -> None:
    # The corner of a type-A causal mask sees only padding: bias_mode decides what it outputs,
    # so the graph must compute more than a plain Conv, and must match eager at the borders.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    apply_masks(model, masks.causal(3, ndim=2, kind="A"), include=nn.Conv2d, bias_mode=bias_mode)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    proto = export(model, x, tmp_path / f"{bias_mode}.onnx", dynamo=dynamo)
    assert op_types(proto).count("Conv") >= 2  # the TorchScript one may add the validity's
    out, _ = run(tmp_path / f"{bias_mode}.onnx", x)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    with torch.no_grad():  # what makes the mode matter: a plain conv would add the bias
        corner = model[0](x)[:, :, 0, 0]
    assert torch.all(corner == 0)
    assert torch.all(model[0].bias != 0)


# -- TorchScript, as the page describes it ---------------------------------------------------


def small_masked() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    apply_masks(model, masks.cross(3, ndim=2), include=nn.Conv2d)
    return model.eval()


def test_torchscript_traces_the_masked_model_and_scripts_the_baked_one() -> None:
    model = small_masked()
    x = torch.randn(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, (x,))
        assert "aten::where" in str(traced.inlined_graph)
        assert torch.equal(traced(x), model(x))
        with pytest.raises(Exception, match="annotation"):
            torch.jit.script(model)
        remove_masks(model)
        scripted = torch.jit.script(model)
    assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize("bias_mode", ["valid", "partial"])
def test_torchscript_trace_with_bias_mode(bias_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    maskparam.apply_mask(conv, masks.causal(3, ndim=2, kind="A"), bias_mode=bias_mode)
    x = torch.randn(1, 1, 8, 8)
    conv.eval()(x)  # eager caches the validity maps of this shape first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(conv, (x,))
    torch.testing.assert_close(traced(x), conv(x))


# -- the page's own script ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_deploying_page_onnx_script_runs(tmp_path: Path) -> None:
    # The page's ONNX script is a captioned block that the docs tests only write to disk, as
    # they run no ONNX; run it here, with the docs tests' own reader of the page.
    spec = importlib.util.spec_from_file_location("_docs_harness", ROOT / "tests/test_docs.py")
    assert spec is not None
    assert spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # its dataclasses look their module up there
    spec.loader.exec_module(harness)
    page = (ROOT / "docs/recipes/deploying.md").read_text("utf-8")
    (script,) = [
        b for b in harness.fenced_blocks(page) if harness._script_name(b) == "export_onnx.py"
    ]
    (tmp_path / "export_onnx.py").write_text(script.body, "utf-8")
    done = subprocess.run(
        [sys.executable, "export_onnx.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(tmp_path.glob("*.onnx"))) == 4
