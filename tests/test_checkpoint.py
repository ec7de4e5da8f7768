from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import maskparam
from maskparam.__main__ import main
from maskparam.apply import apply_mask, get_mask, remove_mask, set_mask
from maskparam.checkpoint import bake_file, bake_state_dict
from maskparam.model import apply_masks
from tests.strategies import ConvCase, MaskPlan, conv_cases, mask_plans, masks_for

PLUS = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
CORNERS = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)


def plain_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ConvTranspose2d(3, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 4),
    )


def masked_net(mask: torch.Tensor = PLUS, bias_mode: str = "channel") -> nn.Sequential:
    net = plain_net()
    per_channel = torch.tensor([1, 0, 1], dtype=torch.bool).reshape(3, 1, 1, 1)
    apply_masks(net, {"0": mask, "3": per_channel & mask, "4": mask}, bias_mode=bias_mode)  # type: ignore[arg-type]
    apply_mask(net[6], torch.rand(4, 72) > 0.5, bias_mode="zero")
    return net


def trained(net: nn.Module, steps: int = 3) -> nn.Module:
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        loss = net(torch.randn(4, 2, 4, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


X = torch.randn(2, 2, 4, 4)
LAYERS = ("0", "3", "4", "6")  # The masked ones.


# -- a masked model loads a plain checkpoint and keeps its masks -------------------------------


@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_plain_checkpoint_loads_strict_and_keeps_the_masks(bias_mode: str) -> None:
    pretrained = trained(plain_net())
    net = masked_net(bias_mode=bias_mode)
    masks = {name: get_mask(net.get_submodule(name)) for name in LAYERS}
    result = net.load_state_dict(pretrained.state_dict(), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    for name, mask in masks.items():
        layer = net.get_submodule(name)
        assert torch.equal(get_mask(layer), mask)
        original = layer.parametrizations.weight.original
        assert torch.equal(original, pretrained.get_submodule(name).weight)  # all of it
    # The same as masking after loading: the pretrained-then-mask order.
    other = plain_net()
    other.load_state_dict(pretrained.state_dict())
    for name, mask in masks.items():
        apply_mask(other.get_submodule(name), mask, bias_mode="zero" if name == "6" else bias_mode)  # type: ignore[arg-type]
    assert torch.equal(net.eval()(X), other.eval()(X))
    state, expected = net.state_dict(), other.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_plain_checkpoint_then_unmask_gives_the_pretrained_weights_back() -> None:
    pretrained = trained(plain_net())
    net = masked_net()
    net.load_state_dict(pretrained.state_dict())
    for layer in (net[0], net[3], net[4], net[6]):
        remove_mask(layer, bake=False)
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pretrained.state_dict().items())


def test_plain_checkpoint_into_a_partly_masked_model_with_assign() -> None:
    pretrained = trained(plain_net())
    net = plain_net()
    apply_mask(net[3], PLUS)
    net.load_state_dict(pretrained.state_dict(), strict=True, assign=True)
    original = net[3].parametrizations.weight.original
    assert isinstance(original, nn.Parameter)
    assert torch.equal(original, pretrained[3].weight)
    assert torch.equal(get_mask(net[3]), PLUS)
    assert torch.all(net[3].weight[..., ~PLUS] == 0)


def test_plain_checkpoint_missing_a_layer_reports_it() -> None:
    state = plain_net().state_dict()
    del state["3.weight"]
    net = masked_net()
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert "3.parametrizations.weight.original" in result.missing_keys
    assert not any(k.startswith("0.") for k in result.missing_keys)
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\).*3.parametrizations.weight.original"
    ):
        net.load_state_dict(state)


def test_plain_key_of_a_tensor_with_another_parametrization_is_left_to_torch() -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    parametrize.register_parametrization(conv, "bias", Double())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"bias\""):
        conv.load_state_dict(nn.Conv2d(1, 1, 3).state_dict())


@given(case=conv_cases(), data=st.data())
def test_plain_checkpoint_property(case: ConvCase, data: st.DataObject) -> None:
    layer = case.layer
    mask = data.draw(masks_for(shape=tuple(layer.weight.shape), spatial_dims=case.x.dim() - 2))
    pretrained = copy.deepcopy(layer)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(-3.0).add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_mask(layer, mask)
        expected = apply_mask(copy.deepcopy(pretrained), mask)
    layer.load_state_dict(pretrained.state_dict(), strict=True)
    assert torch.equal(get_mask(layer), mask)
    assert torch.equal(layer(case.x), expected(case.x))


# -- a masked model loads a masked checkpoint with the checkpoint's masks ----------------------


def test_masked_checkpoint_brings_its_masks() -> None:
    source = trained(masked_net(PLUS))
    net = masked_net(CORNERS)
    net.load_state_dict(source.state_dict(), strict=True)
    for name in LAYERS:
        assert torch.equal(get_mask(net.get_submodule(name)), get_mask(source.get_submodule(name)))
    assert torch.equal(net.eval()(X), source(X))


def test_masked_checkpoint_mask_of_another_shape() -> None:
    full = torch.rand(3, 2, 3, 3) > 0.5
    source = apply_mask(nn.Conv2d(2, 3, 3), full)
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(get_mask(target), full)
    assert torch.equal(target(X), source(X))
    back = apply_mask(nn.Conv2d(2, 3, 3), full)
    back.load_state_dict(apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict())
    assert torch.equal(get_mask(back), PLUS)


def test_masked_checkpoint_does_not_leak_into_layers_that_shared_a_mask() -> None:
    shared = PLUS.clone()
    net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    apply_masks(net, shared, include=nn.Conv2d)
    set_mask(net[0], shared)
    set_mask(net[1], shared)  # Now both layers hold the very same tensor.
    source = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    apply_masks(source, {"0": PLUS, "1": CORNERS})
    net.load_state_dict(source.state_dict())
    assert torch.equal(get_mask(net[0]), PLUS)
    assert torch.equal(get_mask(net[1]), CORNERS)
    assert torch.equal(shared, PLUS)


def test_masked_checkpoint_with_a_0_1_float_mask_is_accepted() -> None:
    state = apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict()
    state["parametrizations.weight.0.mask"] = CORNERS.double()
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS)
    target.load_state_dict(state)
    assert get_mask(target).dtype == torch.bool
    assert torch.equal(get_mask(target), CORNERS)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (PLUS.float() * 0.5, "all 0 or 1"),
        (torch.ones(2, 2, dtype=torch.bool), r"kernel's spatial shape.*mask.shape=\(2, 2\)"),
    ],
)
def test_exception_masked_checkpoint_with_a_bad_mask(bad: torch.Tensor, match: str) -> None:
    state = apply_mask(nn.Conv2d(2, 3, 3), PLUS).state_dict()
    state["parametrizations.weight.0.mask"] = bad
    target = apply_mask(nn.Conv2d(2, 3, 3), CORNERS)
    with pytest.raises(
        RuntimeError,
        match=f"While loading 'parametrizations.weight.0.mask': load_state_dict.*{match}",
    ):
        target.load_state_dict(state)
    assert torch.equal(get_mask(target), CORNERS)


def test_checkpoints_from_the_cpu_load_onto_the_model_device(device: torch.device) -> None:
    source = apply_mask(nn.Conv2d(2, 3, 3), CORNERS)
    target = apply_mask(nn.Conv2d(2, 3, 3), PLUS).to(device)
    target.load_state_dict(nn.Conv2d(2, 3, 3).state_dict())  # plain, on the CPU
    assert get_mask(target).device == target.parametrizations.weight.original.device == device
    target.load_state_dict(source.state_dict())  # masked, on the CPU
    assert get_mask(target).device.type == device.type
    assert torch.equal(get_mask(target).cpu(), CORNERS)
    baked = bake_state_dict(target.state_dict())
    assert baked["weight"].device.type == device.type
    assert torch.equal(baked["weight"].cpu(), source.weight.detach())


# -- bake_state_dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias_mode", ["keep", "zero", "channel"])
def test_bake_state_dict_loads_strict_into_the_plain_model_with_equal_outputs(
    bias_mode: str,
) -> None:
    net = trained(masked_net(bias_mode=bias_mode))
    state = net.state_dict()
    baked = bake_state_dict(state)
    plain = plain_net()
    plain.load_state_dict(baked, strict=True)
    plain.eval()
    assert torch.equal(plain(X), net(X))
    for name in LAYERS:
        masked = net.get_submodule(name)
        assert torch.equal(baked[f"{name}.weight"], masked.weight)
        assert torch.equal(baked[f"{name}.bias"], masked.bias)
    assert baked.keys() == plain.state_dict().keys()


def test_bake_state_dict_leaves_its_input_and_other_entries_alone() -> None:
    state = masked_net().state_dict()
    before = OrderedDict((k, v.clone()) for k, v in state.items())
    baked = bake_state_dict(state)
    assert list(state) == list(before)
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert baked["1.running_mean"] is state["1.running_mean"]
    assert baked["1.num_batches_tracked"] is state["1.num_batches_tracked"]


def test_bake_state_dict_keeps_metadata_without_the_parametrization_containers() -> None:
    state = masked_net().state_dict()
    assert "0.parametrizations.weight.0" in state._metadata  # type: ignore[attr-defined]
    metadata = bake_state_dict(state)._metadata  # type: ignore[attr-defined]
    assert metadata["1"] == state._metadata["1"]  # type: ignore[attr-defined]
    assert "0" in metadata
    assert not any("parametrizations" in key for key in metadata)
    assert dict(bake_state_dict(dict(state))).keys() == bake_state_dict(state).keys()


def test_bake_state_dict_keys_anywhere() -> None:
    conv = apply_mask(nn.Conv1d(1, 1, 3), torch.tensor([1, 0, 1]))
    assert list(bake_state_dict(conv.state_dict())) == ["bias", "weight"]
    prefixed = {f"module._orig_mod.{k}": v for k, v in masked_net().state_dict().items()}
    baked = bake_state_dict(prefixed)
    assert "module._orig_mod.0.weight" in baked
    # A module that is itself named "parametrizations" is not a parametrization.
    holder = nn.Module()
    holder.parametrizations = nn.ModuleDict({"conv": apply_mask(nn.Conv1d(1, 1, 3), PLUS[1])})
    assert list(bake_state_dict(holder.state_dict())) == [
        "parametrizations.conv.bias",
        "parametrizations.conv.weight",
    ]


def test_bake_state_dict_passes_extra_state_and_plain_dicts_through() -> None:
    state = {"layer.weight": torch.ones(2), "layer._extra_state": {"anything": 1}}
    baked = bake_state_dict(state)
    assert baked == state
    assert bake_state_dict(bake_state_dict(masked_net().state_dict())).keys() == (
        bake_state_dict(masked_net().state_dict()).keys()
    )


@given(plan=mask_plans(), bias_mode=st.sampled_from(["keep", "zero", "channel"]))
def test_bake_state_dict_property(plan: MaskPlan, bias_mode: str) -> None:
    plain = copy.deepcopy(plan.model)
    masks = plan.masks
    if bias_mode == "channel":
        masks = {
            k: m
            for k, m in masks.items()
            if m is None or plan.model.get_submodule(k).bias is not None
        }
        if all(m is None for m in masks.values()):
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_masks(plan.model, masks, bias_mode=bias_mode)  # type: ignore[arg-type]
    plain.load_state_dict(bake_state_dict(plan.model.state_dict()), strict=True)
    assert torch.equal(plain(plan.x), plan.model(plan.x))


def test_exception_not_a_state_dict() -> None:
    rule = r"bake_state_dict expects a state_dict: a mapping of str keys to tensors"
    with pytest.raises(TypeError, match=f"{rule}.*Got list."):
        bake_state_dict([torch.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=f"{rule}.*Got the key 3 of type int."):
        bake_state_dict({3: torch.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=f"{rule}.*Got 'epoch': int.$"):
        bake_state_dict({"w": torch.ones(1), "epoch": 3})
    with pytest.raises(
        TypeError,
        match=r"Got 'model': OrderedDict. A training checkpoint.*"
        r"checkpoint\['model'\]",
    ):
        bake_state_dict({"model": masked_net().state_dict(), "epoch": 3})


def test_exception_another_parametrization() -> None:
    linear = nn.Linear(3, 3)
    torch.nn.utils.parametrizations.orthogonal(linear)
    with pytest.raises(
        ValueError,
        match=r"exactly 'original' and '0.mask'.*Got "
        r"'parametrizations.weight' with keys \['.*'\]: another parametrization",
    ):
        bake_state_dict(linear.state_dict())
    conv = apply_mask(nn.Conv2d(1, 1, 3), PLUS)
    conv.parametrizations.weight[0].register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match=r"\['0.mask', '0.scale', 'original'\]"):
        bake_state_dict(conv.state_dict())
    state = apply_mask(nn.Conv2d(1, 1, 3), PLUS).state_dict()
    state["parametrizations.weight.original1"] = state.pop("parametrizations.weight.original")
    with pytest.raises(ValueError, match=r"\['0.mask', 'original1'\]"):
        bake_state_dict(state)


def test_exception_mask_not_bool_or_not_fitting_or_key_taken() -> None:
    state = apply_mask(nn.Conv2d(1, 1, 3), PLUS).state_dict()
    with pytest.raises(ValueError, match=r"a bool tensor. Got 'parametrizations.weight'.*float32"):
        bake_state_dict({**state, "parametrizations.weight.0.mask": PLUS.float()})
    with pytest.raises(
        ValueError,
        match=r"bake_state_dict expects a mask.*mask.shape=\(2,\) for "
        r"parametrizations.weight.original.shape=\(1, 1, 3, 3\)",
    ):
        bake_state_dict(
            {**state, "parametrizations.weight.0.mask": torch.ones(2, dtype=torch.bool)}
        )
    with pytest.raises(ValueError, match=r"plain key, which must be free.*also the key 'weight'"):
        bake_state_dict({**state, "weight": torch.ones(1, 1, 3, 3)})


# -- bake_file and python -m maskparam bake ----------------------------------------------------


@pytest.fixture
def masked_file(tmp_path: Path) -> Path:
    path = tmp_path / "masked.pt"
    torch.save(trained(masked_net()).state_dict(), path)
    return path


def test_cli_bake(masked_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = masked_file.with_name("plain.pt")
    assert main(["bake", str(masked_file), str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"baked 8 masked tensors into {out}: 0.weight, 0.bias, "
    )
    baked = torch.load(out)  # weights_only=True: plain tensors only
    expected = bake_state_dict(torch.load(masked_file))
    assert list(baked) == list(expected)
    assert all(torch.equal(baked[k], expected[k]) for k in baked)
    assert sorted(p.name for p in masked_file.parent.iterdir()) == ["masked.pt", "plain.pt"]
    assert out.stat().st_mode == masked_file.stat().st_mode  # as torch.save leaves a file


def test_cli_bake_plain_file_is_a_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(plain_net().state_dict(), tmp_path / "plain.pt")
    assert main(["bake", str(tmp_path / "plain.pt"), str(tmp_path / "copy.pt")]) == 0
    assert "no masked tensors" in capsys.readouterr().out
    assert torch.load(tmp_path / "copy.pt").keys() == torch.load(tmp_path / "plain.pt").keys()


def test_cli_bake_never_overwrites_unless_asked(
    masked_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = masked_file.read_bytes()
    out = masked_file.with_name("taken.pt")
    out.write_bytes(b"keep me")
    for target, extra in ((out, ""), (masked_file, ", and is the source")):
        err = _cli_error(["bake", str(masked_file), str(target)], capsys)
        assert "never replaces an existing file unless asked (--overwrite)" in err
        assert f"Got target '{target}', which exists{extra}." in err
    assert out.read_bytes() == b"keep me"
    assert masked_file.read_bytes() == original
    assert main(["bake", str(masked_file), str(masked_file), "--overwrite"]) == 0
    assert not any("parametrizations" in k for k in torch.load(masked_file))
    assert sorted(p.name for p in masked_file.parent.iterdir()) == ["masked.pt", "taken.pt"]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The message of a failed ``bake``: exit code 2, one message that names the command."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(("maskparam bake ", "maskparam bake: "))
    assert "usage:" not in captured.err  # the file is at fault, not the command line
    assert "bake_file " not in captured.err  # the command's words, not the function's
    return captured.err


def test_cli_bake_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.pt")
    err = _cli_error(["bake", str(tmp_path / "nope.pt"), out], capsys)
    assert "expects an existing checkpoint file to read" in err
    assert "does not exist" in err
    assert "which is not a file" in _cli_error(["bake", str(tmp_path), out], capsys)

    (tmp_path / "text.pt").write_text("not a checkpoint")
    err = _cli_error(["bake", str(tmp_path / "text.pt"), out], capsys)
    assert f"Got '{tmp_path / 'text.pt'}', which is not one" in err

    torch.save(masked_net(), tmp_path / "whole.pt")
    err = _cli_error(["bake", str(tmp_path / "whole.pt"), out], capsys)
    assert "Unsupported global" in err
    assert "A whole pickled model is not a state_dict" in err

    torch.save({"model": masked_net().state_dict(), "epoch": 3}, tmp_path / "train.pt")
    err = _cli_error(["bake", str(tmp_path / "train.pt"), out], capsys)
    assert "under 'model', pass --key model." in err

    torch.save([torch.ones(1)], tmp_path / "list.pt")
    assert "Got list." in _cli_error(["bake", str(tmp_path / "list.pt"), out], capsys)

    state = masked_net().state_dict()
    state["0.parametrizations.weight.0.mask"] = state["0.parametrizations.weight.0.mask"].float()
    torch.save(state, tmp_path / "float.pt")
    assert "a bool tensor" in _cli_error(["bake", str(tmp_path / "float.pt"), out], capsys)

    torch.save(state, tmp_path / "ok.pt")
    err = _cli_error(["bake", str(tmp_path / "ok.pt"), str(tmp_path / "no" / "out.pt")], capsys)
    assert "whose folder does not exist" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a checkpoint",
        b"# comment\n",
        b"\x80\x02]q\x00.",
        b"\x80\x02.",  # torch.load: IndexError: pop from empty list
        bytes(range(256)),
    ],
    ids=["empty", "text", "comment", "pickle-list", "pickle-stop", "binary"],
)
def test_exception_not_a_pytorch_checkpoint(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.pt"
    source.write_bytes(content)
    with pytest.raises(ValueError, match=r"bake_file expects a PyTorch checkpoint") as info:
        bake_file(source, tmp_path / "out.pt")
    message = str(info.value)
    assert f"Got '{source}', which is not one: torch.load(weights_only=True) cannot read" in (
        message
    )
    assert "pickled model" not in message  # that advice is for pickles of other objects
    err = _cli_error(["bake", str(source), str(tmp_path / "out.pt")], capsys)
    assert err.startswith("maskparam bake expects a PyTorch checkpoint")
    assert not (tmp_path / "out.pt").exists()


def test_exception_not_a_zip_of_tensors(tmp_path: Path) -> None:
    import zipfile

    source = tmp_path / "in.pt"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ValueError, match=r"expects a PyTorch checkpoint.*which is not one"):
        bake_file(source, tmp_path / "out.pt")


@pytest.fixture
def training_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.pt"
    net = trained(masked_net())
    checkpoint = {
        "model": net.state_dict(),
        "ema": {"model": net.state_dict(), "decay": torch.tensor(0.99)},
        "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict(),
        "epoch": 3,
    }
    torch.save(checkpoint, path)
    return path


def test_bake_file_key_replaces_the_nested_state_dict_and_keeps_the_rest(
    training_file: Path,
) -> None:
    out = training_file.with_name("out.pt")
    loaded = torch.load(training_file)
    expected = bake_state_dict(loaded["model"])
    keys = bake_file(training_file, out, key="model")
    assert keys == [f"{name}.{tensor}" for name in LAYERS for tensor in ("weight", "bias")]
    baked = torch.load(out)
    assert list(baked) == ["model", "ema", "optimizer", "epoch"]
    assert list(baked["model"]) == list(expected)
    assert all(torch.equal(baked["model"][k], expected[k]) for k in expected)
    assert baked["epoch"] == 3
    assert baked["optimizer"] == loaded["optimizer"]
    # The other nested state_dict is left as it was: only the named entry is baked.
    assert list(baked["ema"]["model"]) == list(loaded["ema"]["model"])
    plain = plain_net()
    plain.load_state_dict(baked["model"], strict=True)


def test_bake_file_dotted_key_reaches_deeper(training_file: Path) -> None:
    out = training_file.with_name("out.pt")
    keys = bake_file(training_file, out, key="ema.model")
    assert len(keys) == 2 * len(LAYERS)
    baked = torch.load(out)
    plain_net().load_state_dict(baked["ema"]["model"], strict=True)
    assert torch.equal(baked["ema"]["decay"], torch.tensor(0.99))
    assert any("parametrizations" in k for k in baked["model"])  # not asked: unchanged


def test_bake_file_key_with_a_dot_may_be_one_entry(tmp_path: Path) -> None:
    torch.save({"model.ema": masked_net().state_dict()}, tmp_path / "in.pt")
    assert bake_file(tmp_path / "in.pt", tmp_path / "out.pt", key="model.ema")
    plain_net().load_state_dict(torch.load(tmp_path / "out.pt")["model.ema"], strict=True)


def test_exception_bake_file_key(training_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = training_file.with_name("out.pt")
    with pytest.raises(
        ValueError,
        match=r"bake_file expects key='modle' to name an entry of .*dots for deeper levels\. "
        r"Got no entry 'modle': at its top level, the file has the entries "
        r"\['ema', 'epoch', 'model', 'optimizer'\]",
    ):
        bake_file(training_file, out, key="modle")
    with pytest.raises(ValueError, match=r"Got no entry 'x': under 'ema.model', the file has"):
        bake_file(training_file, out, key="ema.model.x")
    with pytest.raises(ValueError, match=r"under 'epoch', the file holds a int, which has no"):
        bake_file(training_file, out, key="epoch.x")
    with pytest.raises(TypeError, match=r"expects .*under 'epoch' to hold a state_dict.*Got int"):
        bake_file(training_file, out, key="epoch")
    with pytest.raises(TypeError, match=r"under 'ema' to hold a state_dict.*pass key='model'"):
        bake_file(training_file, out, key="ema")
    with pytest.raises(TypeError, match=r"key of the nested state_dict as a str.*Got 3 of type"):
        bake_file(training_file, out, key=3)  # type: ignore[arg-type]
    err = _cli_error(["bake", str(training_file), str(out), "--key", "modle"], capsys)
    assert "maskparam bake expects --key modle to name an entry of" in err
    err = _cli_error(["bake", str(training_file), str(out)], capsys)
    assert "If it is a training checkpoint with the model's state_dict under 'model', pass " in err
    assert "--key model." in err
    assert not out.exists()


def test_cli_bake_key(training_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = training_file.with_name("out.pt")
    assert main(["bake", str(training_file), str(out), "--key", "model"]) == 0
    assert capsys.readouterr().out.startswith(
        f"baked {2 * len(LAYERS)} masked tensors under 'model' into {out}: 0.weight, 0.bias, "
    )
    plain_net().load_state_dict(torch.load(out)["model"], strict=True)


def test_bake_file_api_messages_name_the_function(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^bake_file expects an existing checkpoint"):
        bake_file(tmp_path / "nope.pt", tmp_path / "out.pt")
    torch.save({}, tmp_path / "in.pt")
    (tmp_path / "out.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"^bake_file never replaces.*\(overwrite=True\)"):
        bake_file(tmp_path / "in.pt", tmp_path / "out.pt")
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "in.pt")
    with pytest.raises(
        TypeError, match=r"^bake_file expects .* to hold a state_dict.*key='model'"
    ):
        bake_file(tmp_path / "in.pt", tmp_path / "new.pt")


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"maskparam {maskparam.__version__}\n"


def test_cli_version_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "maskparam", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"maskparam {maskparam.__version__}\n"


def test_bake_file_returns_the_baked_keys(masked_file: Path) -> None:
    out = masked_file.with_name("plain.pt")
    expected = [f"{name}.{tensor}" for name in LAYERS for tensor in ("weight", "bias")]
    assert bake_file(masked_file, out) == expected
    assert bake_file(out, out, overwrite=True) == []


@pytest.mark.slow  # three fresh processes, each importing torch
def test_cli_entry_point(masked_file: Path) -> None:
    out = masked_file.with_name("plain.pt")
    command = [sys.executable, "-m", "maskparam", "bake", str(masked_file), str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("baked ")
    again = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 2
    assert again.stderr.startswith("maskparam bake never replaces an existing file")
    (masked_file.parent / "text.pt").write_text("not a checkpoint")
    command[-2:] = [str(masked_file.parent / "text.pt"), str(masked_file.parent / "x.pt")]
    broken = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert broken.returncode == 2
    assert broken.stderr.startswith("maskparam bake expects a PyTorch checkpoint")
    assert "Traceback" not in broken.stderr


def test_cli_bake_system_error_is_named_and_leaves_no_file(
    masked_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = masked_file.with_name("out.pt")
    err = _cli_error(["bake", str(masked_file), str(out)], capsys)
    assert err == "maskparam bake: [Errno 28] No space left on device\n"
    assert sorted(p.name for p in masked_file.parent.iterdir()) == ["masked.pt"]
