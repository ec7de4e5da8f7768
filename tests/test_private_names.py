"""maskparam uses private torch and Python names only in ``_compat.py`` or as it lists there.

The scan reads the package's source (AST, nothing imported or run) and finds, outside
``maskparam/_compat.py``:

- an attribute, a ``getattr``/``hasattr`` name or a string equal to a private name that torch
  or ``sys`` defines (``module._parameters``, ``sys._getframe``, ``"_conv_forward"``), or
  a method of a torch class overridden under its private name (``def _apply``);
- any other ``._name`` that maskparam does not define itself (a library's private name);
- an import of a private torch module or name (``torch.distributed.tensor._utils``);
- an ATen op (``torch.ops.aten.*``) and private Python hooks such as ``__wrapped__``.

Each must be a key of ``_compat.PRIVATE_USES``, whose entries must all still be used and
still exist in the installed torch.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _compat

PACKAGE = Path(__file__).resolve().parents[1] / "maskparam"
COMPAT = PACKAGE / "_compat.py"

# Python hooks that are private by intent, though spelled as dunders.
PRIVATE_DUNDERS = {"__wrapped__", "__closure__", "__globals__", "__code__"}
# Names with a leading underscore that are documented public API.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_names(*owners: object) -> set[str]:
    return {name for owner in owners for name in dir(owner) if _private(name)}


# Private members of the torch classes a masked layer builds on: a use of one of these is
# torch's, whatever else shares the name.
TORCH_MEMBERS = _private_names(
    torch.Tensor,
    torch.autograd.Function,
    parametrize.ParametrizationList,
    nn.Module,
    nn.Module(),
    nn.Conv2d(1, 1, 1),
    nn.ModuleDict(),
    functools.lru_cache(maxsize=None)(len),
)


def _sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _defined_by_maskparam() -> set[str]:
    """Every name the package defines: modules, functions, classes, arguments, attributes."""
    names = {path.stem for path, _ in _sources()}
    for _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.Constant) and str(node.value).startswith("_maskparam"):
                names.add(str(node.value))  # an attribute set by name
    return names - TORCH_MEMBERS


def private_uses(path: Path, tree: ast.Module, ours: set[str]) -> Iterator[tuple[str, int]]:
    """``(name, line)`` for each use of a private name of torch or Python in ``tree``."""
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute):
            name = node.attr
            foreign = _private(name) and name not in ours and name not in PUBLIC_UNDERSCORED
            if name == "aten" or name in PRIVATE_DUNDERS or name in TORCH_MEMBERS or foreign:
                yield name, line
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in TORCH_MEMBERS or node.value in PRIVATE_DUNDERS:
                yield node.value, line
        elif isinstance(node, ast.Call) and _named_lookup(node) not in (None, *ours):
            yield str(_named_lookup(node)), line
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in TORCH_MEMBERS:  # an override of a private method
                yield node.name, line
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("torch", "sys") and any(
                    _private(part) for part in alias.name.split(".")
                ):
                    yield alias.name, line
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] not in ("torch", "sys"):
                continue
            if any(_private(part) for part in node.module.split(".")):
                yield node.module, line
            for alias in node.names:
                if _private(alias.name):
                    yield alias.name, line


def _named_lookup(call: ast.Call) -> str | None:
    """The private name in ``getattr(x, "_name")`` (or hasattr, setattr, delattr), or None."""
    if not (isinstance(call.func, ast.Name) and len(call.args) > 1):
        return None
    name = call.args[1]
    if call.func.id not in ("getattr", "hasattr", "setattr", "delattr"):
        return None
    if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
        return name.value
    return None


def _uses_outside_compat() -> dict[str, list[str]]:
    ours = _defined_by_maskparam()
    found: dict[str, list[str]] = {}
    for path, tree in _sources():
        if path == COMPAT:
            continue
        for name, line in private_uses(path, tree, ours):
            found.setdefault(name, []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return found


def test_no_private_name_outside_compat_unless_listed() -> None:
    unlisted = {
        name: places
        for name, places in _uses_outside_compat().items()
        if name not in _compat.PRIVATE_USES
    }
    assert not unlisted, (
        "private torch/Python names outside maskparam/_compat.py: move each behind a shim "
        f"there, or list it in _compat.PRIVATE_USES with its reason: {unlisted}"
    )


def test_every_listed_private_name_is_still_used() -> None:
    used = _uses_outside_compat()
    stale = sorted(set(_compat.PRIVATE_USES) - set(used))
    assert not stale, f"_compat.PRIVATE_USES lists names nothing uses any more: {stale}"


@pytest.mark.parametrize("name", sorted(_compat.PRIVATE_USES))
def test_listed_private_name_exists_in_torch(name: str) -> None:
    owner_path, reason = _compat.PRIVATE_USES[name]
    module_name, _, attribute = owner_path.rpartition(".")
    owner = getattr(importlib.import_module(module_name), attribute)
    if owner is nn.Module:
        owner = nn.Module()  # its registries are made per instance
    assert hasattr(owner, name), f"PRIVATE_USES[{name!r}]: {owner_path} no longer has it"
    assert len(reason.split()) >= 8, f"PRIVATE_USES[{name!r}]: say why it is needed"


def _scan(source: str) -> set[str]:
    tree = ast.parse(source)
    return {name for name, _ in private_uses(Path("x.py"), tree, {"_mine"})}


def test_the_scan_finds_each_kind_of_private_use() -> None:
    assert _scan("import sys\nframe = sys._getframe(1)") == {"_getframe"}
    assert _scan("x = module._parameters") == {"_parameters"}
    assert _scan('f = getattr(torch._C, "_get_mkldnn_enabled")') == {"_C", "_get_mkldnn_enabled"}
    assert _scan('namespace["_conv_forward"] = f') == {"_conv_forward"}
    assert _scan("class A:\n    def _apply(self, fn): pass") == {"_apply"}
    assert _scan("from torch.distributed.tensor._utils import f") == {
        "torch.distributed.tensor._utils"
    }
    assert _scan("from torch.nn.modules.conv import _ConvNd") == {"_ConvNd"}
    assert _scan("import torch._dynamo") == {"torch._dynamo"}
    assert _scan("torch.ops.aten.convolution_backward(g)") == {"aten"}
    assert _scan("plan = box_plan.__wrapped__") == {"__wrapped__"}
    assert _scan("x = other._hidden") == {"_hidden"}


def test_the_scan_passes_what_maskparam_defines_and_public_names() -> None:
    assert _scan("x = self._mine") == set()
    assert _scan("y = point._replace(x=1)") == set()
    assert _scan("type(m).__name__, m.__dict__, m.__class__") == set()
    assert _scan("torch.ops.maskparam.tap_conv(x)") == set()
