"""Checkpoints of masked models: bake one into plain weights, on its keys alone.

A masked layer saves ``conv.parametrizations.weight.original`` and
``conv.parametrizations.weight.0.mask`` where a plain one saves ``conv.weight``.
:func:`bake_state_dict` turns the first form into the second without the model's class, and
:func:`bake_file` (``python -m maskparam bake``) does it for a file. Loading the other way
needs nothing from here: a masked model loads a plain checkpoint with ``strict=True`` and
keeps its own masks, and loads a masked one with the checkpoint's masks.

A whole pickled model (``torch.save(model)``) can be loaded with ``weights_only=True`` once
:data:`SAFE_GLOBALS` and the model's own classes are allowed, see :data:`SAFE_GLOBALS`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _module_class, taps
from maskparam.parametrizations import BiasMask, FixedMask

__all__ = ["SAFE_GLOBALS", "bake_file", "bake_state_dict"]

SAFE_GLOBALS: tuple[Any, ...] = (
    _module_class._rebuild,
    FixedMask,
    BiasMask,
    parametrize.ParametrizationList,
    nn.ModuleDict,
    *taps.SAFE_GLOBALS,
)
"""What a pickled masked model needs from maskparam and parametrize to load with
``weights_only=True``, on top of the model's own classes (its layers and containers), for
every ``bias_mode`` and ``execution``::

    allowed = [*maskparam.checkpoint.SAFE_GLOBALS, nn.Sequential, nn.Conv2d, nn.ReLU]
    with torch.serialization.safe_globals(allowed):
        model = torch.load(path)

Only allow classes from files you trust. A ``state_dict`` needs none of this: it holds only
tensors, so the default ``torch.load(path)`` reads it.
"""

# `<owner>parametrizations.<tensor>.original` (or original0, original1, ... for
# parametrizations whose right_inverse returns several tensors); <owner> is "" or ends in ".".
_ORIGINAL = re.compile(r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.original\d*$")
# What a maskparam mask saves under ``parametrizations.<name>.``; the first is all a mask
# saves now, the second is what files written by maskparam 0.1.x hold (may be dropped in 1.0).
_MASK_KEYS = ["0.mask", "original"]
_MASK_KEYS_0_1 = [f"0.{_compat.EXTRA_STATE_KEY}", "0.mask", "original"]


def bake_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a masked model's ``state_dict`` into a plain one, masked values baked in.

    Works on the keys alone, so it needs no model class: every
    ``X.parametrizations.T.original`` with its ``X.parametrizations.T.0.mask`` becomes
    ``X.T = torch.where(mask, original, 0)``, which is bitwise the masked model's ``X.T``.
    A bias held by ``bias_mode="zero"`` or ``"channel"`` is baked the same way. Every other
    entry is passed through as it is, and the input is not modified. Loading the result into
    the plain architecture with ``strict=True`` gives the masked model's outputs.

    Options that change how a masked layer *computes* rather than its weights leave no
    trace in a ``state_dict``: a plain layer fed the baked weights adds its bias everywhere,
    so it matches a layer with ``bias_mode="valid"`` or ``"partial"`` only where every tap
    sees valid input. ``execution=`` changes only how the output is computed, not what it is.

    Keys alone also cannot show a parametrization that saves nothing, so a group of exactly
    ``original``, ``0.mask`` (a bool tensor that fits it) and optionally ``0._extra_state``
    (the values the mask hid, saved by maskparam 0.1 and dropped by baking) is taken for a
    maskparam mask; any other group of parametrization keys is refused rather than guessed at.

    Args:
        state_dict: A ``state_dict`` (``str`` keys, tensor values and any ``_extra_state``
            entries), such as ``model.state_dict()`` or ``torch.load`` of a saved one. Keys
            may carry any prefix (``module.`` from DDP, ``_orig_mod.`` from
            :func:`torch.compile`); a prefix is kept as it is.

    Returns:
        A new ``dict`` (an ``OrderedDict`` that keeps the input's ``_metadata``, like a
        ``state_dict``) with no parametrization keys. Unchanged entries are the same tensor
        objects as in the input.

    Raises:
        TypeError: If ``state_dict`` is not a mapping of ``str`` keys to tensors, such as a
            training checkpoint that holds one next to other things.
        ValueError: If a parametrized tensor is not a maskparam mask (other parametrizations,
            several originals, a mask that is not bool or does not fit), if its plain key
            is already taken, or if it is sharded (a DTensor, from FSDP).

    Example:
        >>> from maskparam.apply import apply_mask
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3, bias=False), torch.tensor([1, 0, 1]))
        >>> conv.weight = torch.tensor([[[1.0, 2.0, 3.0]]])
        >>> sorted(conv.state_dict())
        ['parametrizations.weight.0.mask', 'parametrizations.weight.original']
        >>> dict(bake_state_dict(conv.state_dict()))
        {'weight': tensor([[[1., 0., 3.]]])}
    """
    baked, _ = _bake(state_dict, "bake_state_dict")
    return baked


def bake_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    key: str | None = None,
) -> list[str]:
    """Bake a checkpoint file: :func:`bake_state_dict` from ``source`` into ``target``.

    The command line ``python -m maskparam bake IN.pt OUT.pt`` runs this. ``source`` is read
    with ``torch.load(weights_only=True)`` onto the CPU, so a file that holds anything but
    tensors and plain containers (a whole pickled model, say) is refused before anything in
    it runs. ``target`` is written whole to a temporary file next to it, then moved into
    place, so an interrupted run never leaves half a file, not even with ``overwrite=True``
    and ``target`` the same file as ``source``.

    A training checkpoint that nests the ``state_dict``, such as
    ``{"model": model.state_dict(), "optimizer": ..., "epoch": 3}``, needs ``key="model"``
    (``--key model``); a dotted key such as ``"ema.model"`` reaches deeper, level by level,
    unless the whole string is itself an entry. The baked ``state_dict`` then replaces the
    nested one and every other entry is written back as it was. An optimizer's state in
    such a file refers to parameters by position, and a masked layer lists its parameters
    in another order than the plain one (``bias`` before the weight's ``original``), so do
    not load that optimizer state into an optimizer of the plain model.

    Args:
        source: A file written by ``torch.save(model.state_dict(), source)``, or by
            ``torch.save(checkpoint, source)`` with the ``state_dict`` under ``key``.
        target: Where to write the baked ``state_dict`` (or checkpoint, with ``key``).
        overwrite: Whether ``target`` may replace an existing file (``source`` included).
        key: The entry of the checkpoint that holds the ``state_dict``; dots for deeper
            levels. None: the file is the ``state_dict``.

    Returns:
        The plain keys that were baked, such as ``["conv.weight"]``; empty if the
        ``state_dict`` held no masks (``target`` is then a copy).

    Raises:
        FileNotFoundError: If ``source`` does not exist, or the folder of ``target``.
        FileExistsError: If ``target`` exists and ``overwrite`` is False.
        TypeError: If ``source`` (or its entry ``key``) holds something other than a
            ``state_dict``, or ``key`` is not a str.
        ValueError: If ``source`` is not a PyTorch checkpoint that
            ``torch.load(weights_only=True)`` can read, ``key`` names no entry of it, or
            :func:`bake_state_dict` refuses its contents.

    Example:
        >>> import tempfile
        >>> from maskparam.apply import apply_mask
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3), torch.tensor([1, 0, 1]))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(conv.state_dict(), f"{folder}/masked.pt")
        ...     print(bake_file(f"{folder}/masked.pt", f"{folder}/plain.pt"))
        ...     print(sorted(torch.load(f"{folder}/plain.pt")))
        ...     torch.save({"model": conv.state_dict(), "epoch": 3}, f"{folder}/train.pt")
        ...     print(bake_file(f"{folder}/train.pt", f"{folder}/out.pt", key="model"))
        ...     print(torch.load(f"{folder}/out.pt")["epoch"])
        ['weight']
        ['bias', 'weight']
        ['weight']
        3
    """
    return _bake_file(source, target, overwrite=overwrite, key=key, voice=_API)


@dataclass(frozen=True)
class _Voice:
    """How the messages of :func:`bake_file` name the caller and its options.

    The Python function and the command line (``maskparam.__main__``) share the checks,
    and each speaks its own language: ``bake_file ... key='model'`` or
    ``maskparam bake ... --key model``.

    Attributes:
        caller: The name that starts every message.
        overwrite: How to ask for an existing target to be replaced.
        key: How to pass a given key.
    """

    caller: str
    overwrite: str
    key: Callable[[str], str]


_API = _Voice("bake_file", overwrite="overwrite=True", key=lambda key: f"key={key!r}")


def _bake_file(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    overwrite: bool,
    key: str | None,
    voice: _Voice,
) -> list[str]:
    """:func:`bake_file`, with messages in the caller's ``voice``."""
    caller = voice.caller
    source, target = Path(source), Path(target)
    if key is not None and not isinstance(key, str):
        raise TypeError(
            f"{caller} expects the key of the nested state_dict as a str, dots for deeper "
            f"levels, such as 'model'. Got {key!r} of type {type(key).__name__}."
        )
    if not source.is_file():
        raise FileNotFoundError(
            f"{caller} expects an existing checkpoint file to read. Got {str(source)!r}, "
            f"which {'is not a file' if source.exists() else 'does not exist'}."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"{caller} writes into an existing folder. Got target "
            f"{str(target)!r}, whose folder does not exist."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{caller} never replaces an existing file unless asked ({voice.overwrite}). "
            f"Got target {str(target)!r}, which exists"
            f"{', and is the source' if _same_file(source, target) else ''}."
        )
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except OSError:
        raise  # The file could not be read at all (permissions, say): its own message is best.
    except Exception as err:  # torch.load raises all sorts on a file it cannot parse.
        raise ValueError(_unreadable(source, err, caller)) from None
    state_dict, put_back = _nested(loaded, key, str(source), voice)
    holder = f"{str(source)!r}" if key is None else f"{str(source)!r} under {key!r}"
    baked, keys = _bake(state_dict, caller, holder=holder, voice=voice)
    # Not tempfile.mkstemp: its file is private (0600), and os.replace would keep that.
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        torch.save(put_back(baked), temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return keys


# -- helpers ------------------------------------------------------------------------------


def _bake(
    state_dict: object, caller: str, *, holder: str | None = None, voice: _Voice | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The baked ``state_dict`` and the plain keys it baked; checks everything first.

    ``holder`` names where ``state_dict`` came from (a file), ``voice`` how to suggest a key.
    """
    _check_state_dict(state_dict, caller, holder=holder, voice=voice)
    assert isinstance(state_dict, Mapping)
    plain_of: dict[str, str] = {}  # "<owner>parametrizations.<t>.original" -> "<owner><t>"
    owners: set[str] = set()
    for key in state_dict:
        found = _ORIGINAL.match(key)
        if found is None:
            continue
        owner, tensor = found["owner"], found["tensor"]
        group = f"{owner}parametrizations.{tensor}."
        if group + "original" in plain_of:
            continue
        members = sorted(k[len(group) :] for k in state_dict if k.startswith(group))
        where = f"{group[:-1]!r} with keys {members}"
        if members not in (_MASK_KEYS, _MASK_KEYS_0_1):
            raise ValueError(
                f"{caller} bakes maskparam masks, which save exactly 'original' and '0.mask' "
                "(and, from maskparam 0.1, '0._extra_state': the values the mask hid) under "
                f"'parametrizations.<name>.'. Got {where}: another parametrization, "
                "which keys alone cannot undo. Remove it on the model with "
                "torch.nn.utils.parametrize.remove_parametrizations before saving."
            )
        original, mask = state_dict[group + "original"], state_dict[group + "0.mask"]
        _check_mask_entry(original, mask, where, caller)
        _checks.check_mask_fits(mask, original, group + "original", caller)
        if owner + tensor in state_dict:
            raise ValueError(
                f"{caller} writes a baked tensor under its plain key, which must be free. "
                f"Got {where} and also the key {owner + tensor!r}."
            )
        plain_of[group + "original"] = owner + tensor
        owners.add(owner)

    mask_keys = {
        key.removesuffix("original") + member
        for key in plain_of
        for member in _MASK_KEYS_0_1
        if member != "original"
    }
    baked: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        if key in plain_of:
            mask = state_dict[key.removesuffix("original") + "0.mask"].to(value.device)
            baked[plain_of[key]] = torch.where(mask, value, 0)  # Exactly what FixedMask computes.
        elif key not in mask_keys:
            baked[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping):
        # Drop the entries of the parametrization containers, which no longer exist.
        gone = {f"{owner}parametrizations" for owner in owners}
        baked._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, v)
            for k, v in metadata.items()
            if not any(k == g or k.startswith(g + ".") for g in gone)
        )
    return baked, list(plain_of.values())


def _check_state_dict(
    state_dict: object, caller: str, *, holder: str | None = None, voice: _Voice | None = None
) -> None:
    what = "a state_dict" if holder is None else f"{holder} to hold a state_dict"
    rule = (
        f"{caller} expects {what}: a mapping of str keys to tensors (plus any "
        "'_extra_state' entries), as model.state_dict() returns."
    )
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{rule} Got {type(state_dict).__name__}.")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{rule} Got the key {key!r} of type {type(key).__name__}.")
        if isinstance(value, Tensor) or key.rsplit(".", 1)[-1] == _compat.EXTRA_STATE_KEY:
            continue
        hint = ""
        if isinstance(value, Mapping) and voice is not None:
            hint = (
                f" If it is a training checkpoint with the model's state_dict under {key!r}, "
                f"pass {voice.key(key)}."
            )
        elif isinstance(value, Mapping):
            hint = (
                f" A training checkpoint that holds the model's state_dict under {key!r} "
                f"needs that entry passed on its own, such as checkpoint[{key!r}]."
            )
        raise TypeError(f"{rule} Got {key!r}: {type(value).__name__}.{hint}")


def _unreadable(source: Path, err: BaseException, caller: str) -> str:
    """Why ``torch.load(weights_only=True)`` could not read ``source``, for a person."""
    found = _compat.unsupported_global(err)
    if found is not None:
        return (
            f"{caller} expects a checkpoint of tensors and plain containers, which "
            "torch.load(weights_only=True) reads without running any code. Got "
            f"{str(source)!r}, which holds other objects: {found}. A whole pickled model "
            "is not a state_dict: load it (only if you trust it) and save "
            "model.state_dict() instead."
        )
    return (
        f"{caller} expects a PyTorch checkpoint, a file that torch.save wrote. Got "
        f"{str(source)!r}, which is not one: torch.load(weights_only=True) cannot read it "
        f"({type(err).__name__})."
    )


def _nested(
    loaded: Any, key: str | None, source: str, voice: _Voice
) -> tuple[Any, Callable[[Any], Any]]:
    """The entry of ``loaded`` that ``key`` names, and how to put another in its place.

    ``key`` is one entry if the file has it, else a dotted path, one entry per level; None
    names the whole file. Putting a value back copies each level on the path, so
    ``loaded`` itself never changes.
    """
    path: list[str] = []
    if key is not None:
        path = [key] if isinstance(loaded, Mapping) and key in loaded else key.split(".")
    entry = loaded
    for depth, part in enumerate(path):
        if not isinstance(entry, Mapping) or part not in entry:
            reached = ".".join(path[:depth])
            at = f"under {reached!r}" if depth else "at its top level"
            has = (
                f"has the entries {sorted(map(str, entry))}"
                if isinstance(entry, Mapping)
                else f"holds a {type(entry).__name__}, which has no entries"
            )
            raise ValueError(
                f"{voice.caller} expects {voice.key(str(key))} to name an entry of "
                f"{source!r}, dots for deeper levels. Got no entry {part!r}: {at}, the file "
                f"{has}."
            )
        entry = entry[part]

    def put(value: Any, level: Any = loaded, depth: int = 0) -> Any:
        if depth == len(path):
            return value
        copy = type(level)(level) if isinstance(level, dict) else dict(level)
        copy[path[depth]] = put(value, level[path[depth]], depth + 1)
        return copy

    return entry, put


def _check_mask_entry(original: Tensor, mask: Tensor, where: str, caller: str) -> None:
    if _compat.is_dtensor(original) or _compat.is_dtensor(mask):
        raise ValueError(
            f"{caller} expects whole tensors. Got {where}, sharded as a DTensor (FSDP). Take "
            "a full state_dict first: torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))."
        )
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{caller} expects the mask as maskparam saves it, a bool tensor. Got {where}, "
            f"its mask of dtype={mask.dtype}: a parametrization other than maskparam's."
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
