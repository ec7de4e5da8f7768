"""bake_file and python -m maskparam bake: files, nested keys, and messages in each voice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskparam
from maskparam.__main__ import main
from maskparam.checkpoint import bake_file, bake_state_dict
from tests.checkpoint_helpers import LAYERS, masked_net, plain_net, trained

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
