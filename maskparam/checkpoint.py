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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam import _checks, _compat, _module_class
from maskparam.parametrizations import BiasMask, FixedMask

__all__ = ["SAFE_GLOBALS", "bake_file", "bake_state_dict"]

SAFE_GLOBALS: tuple[Any, ...] = (
    _module_class._rebuild,
    FixedMask,
    BiasMask,
    parametrize.ParametrizationList,
    nn.ModuleDict,
)
"""What a pickled masked model needs from maskparam and parametrize to load with
``weights_only=True``, on top of the model's own classes (its layers and containers)::

    allowed = [*maskparam.checkpoint.SAFE_GLOBALS, nn.Sequential, nn.Conv2d, nn.ReLU]
    with torch.serialization.safe_globals(allowed):
        model = torch.load(path)

Only allow classes from files you trust. A ``state_dict`` needs none of this: it holds only
tensors, so the default ``torch.load(path)`` reads it.
"""

# `<owner>parametrizations.<tensor>.original` (or original0, original1, ... for
# parametrizations whose right_inverse returns several tensors); <owner> is "" or ends in ".".
_ORIGINAL = re.compile(r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.original\d*$")
_EXTRA_STATE = "_extra_state"


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
    (the values the mask hides, dropped by baking) is taken for a maskparam mask; any other
    group of parametrization keys is refused rather than guessed at.

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
        >>> sorted(conv.state_dict())  # doctest: +NORMALIZE_WHITESPACE
        ['parametrizations.weight.0._extra_state', 'parametrizations.weight.0.mask',
         'parametrizations.weight.original']
        >>> dict(bake_state_dict(conv.state_dict()))
        {'weight': tensor([[[1., 0., 3.]]])}
    """
    baked, _ = _bake(state_dict, "bake_state_dict")
    return baked


def bake_file(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False
) -> list[str]:
    """Bake a ``state_dict`` file: :func:`bake_state_dict` from ``source`` into ``target``.

    The command line ``python -m maskparam bake IN.pt OUT.pt`` runs this. ``source`` is read
    with ``torch.load(weights_only=True)`` onto the CPU, so a file that holds anything but
    tensors (a whole pickled model, say) is refused before anything in it runs. ``target``
    is written whole to a temporary file next to it, then moved into place, so an
    interrupted run never leaves half a file, not even with ``overwrite=True`` and
    ``target`` the same file as ``source``.

    Args:
        source: A file written by ``torch.save(model.state_dict(), source)``.
        target: Where to write the baked ``state_dict``.
        overwrite: Whether ``target`` may replace an existing file (``source`` included).

    Returns:
        The plain keys that were baked, such as ``["conv.weight"]``; empty if ``source``
        held no masks (``target`` is then a copy).

    Raises:
        FileNotFoundError: If ``source`` does not exist, or the folder of ``target``.
        FileExistsError: If ``target`` exists and ``overwrite`` is False.
        TypeError: If ``source`` holds something other than a ``state_dict``.
        ValueError: If ``torch.load(weights_only=True)`` cannot read ``source``, or
            :func:`bake_state_dict` refuses its contents.

    Example:
        >>> import tempfile
        >>> from maskparam.apply import apply_mask
        >>> conv = apply_mask(nn.Conv1d(1, 1, 3), torch.tensor([1, 0, 1]))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(conv.state_dict(), f"{folder}/masked.pt")
        ...     print(bake_file(f"{folder}/masked.pt", f"{folder}/plain.pt"))
        ...     print(sorted(torch.load(f"{folder}/plain.pt")))
        ['weight']
        ['bias', 'weight']
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(
            f"bake_file expects an existing state_dict file to read. Got {str(source)!r}, "
            f"which {'is not a file' if source.exists() else 'does not exist'}."
        )
    if not target.parent.is_dir():
        raise FileNotFoundError(
            "bake_file writes into an existing folder. Got target "
            f"{str(target)!r}, whose folder does not exist."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(
            "bake_file never replaces an existing file unless asked (overwrite=True, or "
            f"--overwrite on the command line). Got target {str(target)!r}, which exists"
            f"{', and is the source' if _same_file(source, target) else ''}."
        )
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises all sorts on a file it cannot parse.
        raise ValueError(
            "bake_file expects a state_dict file, as torch.save(model.state_dict(), path) "
            f"writes, that torch.load(path, weights_only=True) can read. It could not read "
            f"{str(source)!r}: {_first_reason(err)} A whole pickled model is not a "
            "state_dict: load it (only if you trust it) and save model.state_dict() instead."
        ) from None
    baked, keys = _bake(loaded, "bake_file")
    # Not tempfile.mkstemp: its file is private (0600), and os.replace would keep that.
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        torch.save(baked, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return keys


# -- helpers ------------------------------------------------------------------------------


def _bake(state_dict: object, caller: str) -> tuple[dict[str, Any], list[str]]:
    """The baked ``state_dict`` and the plain keys it baked; checks everything first."""
    _check_state_dict(state_dict, caller)
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
        if members not in (["0.mask", "original"], ["0._extra_state", "0.mask", "original"]):
            raise ValueError(
                f"{caller} bakes maskparam masks, which save exactly 'original', '0.mask' and "
                "'0._extra_state' (the values the mask hides) under "
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
        for member in ("0.mask", "0._extra_state")
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


def _check_state_dict(state_dict: object, caller: str) -> None:
    rule = (
        f"{caller} expects a state_dict: a mapping of str keys to tensors (plus any "
        "'_extra_state' entries), as model.state_dict() returns."
    )
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{rule} Got {type(state_dict).__name__}.")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{rule} Got the key {key!r} of type {type(key).__name__}.")
        if isinstance(value, Tensor) or key.rsplit(".", 1)[-1] == _EXTRA_STATE:
            continue
        hint = ""
        if isinstance(value, Mapping):
            hint = (
                f" A training checkpoint that holds the model's state_dict under {key!r} "
                f"needs that entry passed on its own, such as checkpoint[{key!r}]."
            )
        raise TypeError(f"{rule} Got {key!r}: {type(value).__name__}.{hint}")


def _check_mask_entry(original: Tensor, mask: Tensor, where: str, caller: str) -> None:
    if _is_sharded(original) or _is_sharded(mask):
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


def _is_sharded(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _first_reason(err: BaseException) -> str:
    """The line of a ``torch.load`` error that says what is wrong, as one sentence."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = _compat.unsupported_global(err)
    if refused is not None:
        return refused + "."
    text = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    return text if text.endswith(".") else text + "."
