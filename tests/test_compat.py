"""Each shim of maskparam._compat against the installed torch: a failure names the shim."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from maskparam import _compat


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class _NotAllowed:
    """A class torch.load(weights_only=True) refuses."""


def test_conv_nd_is_the_base_of_every_conv() -> None:
    for kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d):
        assert issubclass(kind, _compat.ConvNd), "ConvNd: torch renamed nn.modules.conv._ConvNd"
    conv = nn.Conv2d(1, 1, 3)
    for attr in ("transposed", "padding_mode", "_conv_forward"):
        assert hasattr(conv, attr), f"ConvNd: convs no longer have {attr!r}"


class _WithExtraState(nn.Module):
    def get_extra_state(self) -> int:
        return 1

    def set_extra_state(self, state: object) -> None:
        pass


def test_extra_state_key() -> None:
    keys = list(nn.Sequential(_WithExtraState()).state_dict())
    assert keys == [f"0.{_compat.EXTRA_STATE_KEY}"], (
        f"EXTRA_STATE_KEY: torch now saves extra state under {keys}"
    )


def test_inject_property() -> None:
    assert callable(getattr(parametrize, "_inject_property", None)), (
        "inject_property: torch removed parametrize._inject_property"
    )
    conv = nn.Conv1d(1, 1, 3)
    parametrize.register_parametrization(conv, "weight", _Double())
    conv.__class__ = type("Fresh", (nn.Conv1d,), {})  # a class without the property
    _compat.inject_property(conv, "weight")
    assert isinstance(type(conv).__dict__.get("weight"), property), (
        "inject_property: parametrize._inject_property no longer installs a property"
    )
    torch.testing.assert_close(conv.weight, 2 * conv.parametrizations.weight.original)


def test_dense_conv_forward() -> None:
    params = list(inspect.signature(nn.Conv2d._conv_forward).parameters)
    assert params == ["self", "input", "weight", "bias"], (
        f"dense_conv_forward: Conv2d._conv_forward now takes {params}"
    )
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5)
    got = _compat.dense_conv_forward(nn.Conv2d, conv, x, conv.weight, conv.bias)
    torch.testing.assert_close(got, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_reversed_padding() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=(1, 2), padding_mode="reflect")
    assert _compat.reversed_padding(conv) == [2, 2, 1, 1], (
        "reversed_padding: _reversed_padding_repeated_twice changed meaning"
    )
    same = nn.Conv1d(1, 1, 4, padding="same", padding_mode="circular")
    assert _compat.reversed_padding(same) == [1, 2]  # the odd extra zero on the right


def test_load_state_dict_post_hooks() -> None:
    conv = nn.Conv1d(1, 1, 3)
    calls: list[int] = []

    def hook(module: nn.Module, keys: object) -> None:
        calls.append(1)

    conv.register_load_state_dict_post_hook(hook)
    hooks = _compat.load_state_dict_post_hooks(conv)
    assert any(h is hook for h in hooks.values()), (
        "load_state_dict_post_hooks: _load_state_dict_post_hooks no longer holds the hooks"
    )
    conv.load_state_dict(conv.state_dict())
    for key in [k for k, h in hooks.items() if h is hook]:
        del hooks[key]
    conv.load_state_dict(conv.state_dict())
    assert calls == [1], "load_state_dict_post_hooks: deleting from the dict no longer unhooks"


def test_functorch_active() -> None:
    assert hasattr(torch._C, "_are_functorch_transforms_active"), (
        "functorch_active: torch._C._are_functorch_transforms_active is gone"
    )
    assert not _compat.functorch_active()
    seen: list[bool] = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(_compat.functorch_active())
        return x

    torch.func.vmap(probe)(torch.ones(2, 3))
    assert seen == [True], "functorch_active: no longer True under vmap"


def test_forward_ad_level() -> None:
    assert hasattr(fwAD, "_current_level"), (
        "forward_ad_level: torch.autograd.forward_ad._current_level is gone"
    )
    assert _compat.forward_ad_level() == -1
    with fwAD.dual_level():
        assert _compat.forward_ad_level() >= 0, "forward_ad_level: not set in dual_level"
    assert _compat.forward_ad_level() == -1


def test_tensor_version() -> None:
    t = torch.zeros(3)
    before = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) > before, "tensor_version: in-place ops no longer bump it"


def test_view_base() -> None:
    t = torch.zeros(4, 4)
    assert _compat.view_base(t[1:]) is t, "view_base: Tensor._base no longer gives the base"
    assert _compat.view_base(t) is t


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_conv_add() -> None:
    if torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        assert hasattr(torch._C, "_get_mkldnn_enabled"), "can_add_conv_in_place: gone"
        assert hasattr(torch.ops.mkldnn, "_convolution_pointwise_"), (
            "conv_add_: torch.ops.mkldnn._convolution_pointwise_ is gone"
        )
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3)
    out = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    expected = out + F.conv2d(x, w, padding=1)
    _compat.conv_add_(out, x, w, (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(out, expected, msg="conv_add_: no longer adds the conv")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _compat.can_add_conv_in_place(x)


def test_unsupported_global() -> None:
    buf = io.BytesIO()
    torch.save({"x": _NotAllowed()}, buf)
    buf.seek(0)
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever torch raises
        torch.load(buf, weights_only=True)
    found = _compat.unsupported_global(info.value)
    assert found == f"Unsupported global: GLOBAL {__name__}._NotAllowed", (
        f"unsupported_global: torch.load's message changed: {info.value}"
    )
    assert _compat.unsupported_global(ValueError("something else")) is None


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_local_shard() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, _utils, distribute_tensor

    assert callable(getattr(_utils, "compute_local_shape_and_global_offset", None)), (
        "local_shard: torch removed compute_local_shape_and_global_offset"
    )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.randn(4, 2, 3, 3), mesh, [Shard(0)])
        mask = torch.rand(3, 3) > 0.5
        assert torch.equal(_compat.local_shard(mask, weight), mask.reshape(1, 1, 3, 3)), (
            "local_shard: a broadcasting mask is not cut"
        )
        full = torch.rand(4, 2, 3, 3) > 0.5
        assert torch.equal(_compat.local_shard(full, weight), full), "local_shard: wrong cut"
    finally:
        dist.destroy_process_group()


def test_is_dtensor() -> None:
    assert not _compat.is_dtensor(torch.zeros(2)), "is_dtensor: a plain tensor is no DTensor"
    if not torch.distributed.is_available():
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert _compat.is_dtensor(sharded), "is_dtensor: a DTensor is not recognised"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_convolution_backward(needs: tuple[bool, bool]) -> None:
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    args = ((2, 1), (1, 0), (1, 2))
    out = F.conv2d(x, w, None, *args, groups=2)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    got_x, got_w = _compat.convolution_backward(grad, x.detach(), w.detach(), args, 2, needs)
    for name, need, got, expected in (
        ("input", needs[0], got_x, gx),
        ("weight", needs[1], got_w, gw),
    ):
        if need:
            assert got is not None, f"convolution_backward: no {name} gradient"
            torch.testing.assert_close(
                got, expected, msg=f"convolution_backward: wrong {name} gradient"
            )
        else:
            assert got is None, f"convolution_backward: a {name} gradient nobody asked for"


def test_every_shim_has_a_test_here() -> None:
    source = Path(__file__).read_text()
    untested = [
        name
        for name in _compat.__all__
        if name != "PRIVATE_USES" and f"_compat.{name}" not in source  # test_private_names
    ]
    assert not untested, f"shims of maskparam._compat without a test in this file: {untested}"
