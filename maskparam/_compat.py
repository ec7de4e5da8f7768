"""Every use of torch internals in maskparam: small shims here, and the list of the rest.

Torch gives no public way to do what these do. Each shim says why it exists and which torch
it was written against; ``tests/test_compat.py`` checks each against the installed torch and
fails, naming the shim, when torch changes what it relies on. Outside this module, maskparam
uses only the private names in :data:`PRIVATE_USES`, each with its reason;
``tests/test_private_names.py`` scans the package and fails on any other, and checks that
torch still has every name listed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "EXTRA_STATE_KEY",
    "PRIVATE_USES",
    "ConvNd",
    "can_add_conv_in_place",
    "conv_add_",
    "convolution_backward",
    "dense_conv_forward",
    "forward_ad_level",
    "functorch_active",
    "inject_property",
    "is_dtensor",
    "load_state_dict_post_hooks",
    "local_shard",
    "reversed_padding",
    "tensor_version",
    "unsupported_global",
    "view_base",
]

PRIVATE_USES: dict[str, tuple[str, str]] = {
    "_parameters": (
        "torch.nn.Module",
        "A module's own parameters by name, None entries included, in registration order: "
        "a masked layer restores that order when it is unmasked, checks that a name is a "
        "parameter rather than a buffer, and a transaction restores the dict as it was. "
        "named_parameters() skips None and cannot assign.",
    ),
    "_buffers": (
        "torch.nn.Module",
        "A module's own buffers by name: apply_mask tells a buffer from a parameter, and a "
        "transaction restores the dict exactly as it was.",
    ),
    "_modules": (
        "torch.nn.Module",
        "A module's own children by name: the optimizer hold and a transaction reach a "
        "layer's ``parametrizations`` container without walking every submodule.",
    ),
    "_load_from_state_dict": (
        "torch.nn.Module",
        "A masked module fits a checkpoint's keys to its masks (plain or masked, either "
        "shape) before its children load, and FixedMask drops the extra state of files "
        "written by maskparam 0.1.x; load_state_dict pre-hooks cannot report errors the "
        "way a strict load does.",
    ),
    "_apply": (
        "torch.nn.Module",
        "FixedMask keeps its mask's values through every conversion (``.to()``, "
        "``to_empty``): _apply is the one method that all of them call.",
    ),
    "_conv_forward": (
        "torch.nn.Conv2d",
        "Masked convs with a bias mode or an execution replace the step after the weight is "
        "read (see dense_conv_forward); Conv1d/2d/3d define it with this name.",
    ),
}
"""The private torch names that maskparam uses outside this module: name -> (where torch
defines it, why maskparam uses it). Checked on torch 2.13."""

ConvNd = nn.modules.conv._ConvNd
"""The base class of Conv1d/2d/3d and ConvTranspose1d/2d/3d (since torch 1.0; checked on 2.13).

Private by name, but the one class that holds what every conv has (``transposed``,
``padding_mode``, ``_conv_forward``); torch exports no public alias for it.
"""


EXTRA_STATE_KEY = "_extra_state"
"""The last part of the ``state_dict`` key under which torch saves a module's extra state.

Why: :meth:`~torch.nn.Module.get_extra_state` is saved as ``<prefix>_extra_state``; torch
names the suffix only in the private ``torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX``.
Since torch 1.10 (checked on torch 2.13).
"""


def inject_property(module: nn.Module, tensor_name: str) -> None:
    """Install on ``type(module)`` the property torch's parametrize gives ``tensor_name``.

    Why: a module made with :func:`copy.deepcopy` or unpickled needs its own generated
    class with the same property torch would install; torch has no public function that
    makes it. ``parametrize._inject_property(module, name)``, since torch 1.9 (checked on
    torch 2.13).
    """
    parametrize._inject_property(module, tensor_name)


def dense_conv_forward(
    base: type[nn.Module], module: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """The convolution of ``base`` (Conv1d/2d/3d) on ``module``, as its own forward runs it.

    Why: maskparam replaces ``_conv_forward`` (the step after the parametrized weight is
    read) and calls the original for the dense path; the method is private. Present with
    this signature ``(input, weight, bias)`` since torch 1.8 (checked on torch 2.13).
    """
    out: Tensor = base._conv_forward(module, input, weight, bias)  # type: ignore[attr-defined]
    return out


def reversed_padding(module: nn.Module) -> list[int]:
    """The ``F.pad`` argument a conv with a ``padding_mode`` other than zeros pads with.

    Why: torch computes it in ``__init__`` (also for ``padding="same"``, where it is not
    symmetric) and keeps it in the private ``_reversed_padding_repeated_twice``; recomputing
    it would mirror torch's arithmetic. Since torch 1.5 (checked on torch 2.13).
    """
    pad: list[int] = list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]
    return pad


def load_state_dict_post_hooks(module: nn.Module) -> MutableMapping[int, Any]:
    """The module's ``load_state_dict`` post-hooks, by handle id.

    Why: registering a hook once per module needs to see which are there, and removing it
    without its handle needs the dict; torch keeps it in the private
    ``_load_state_dict_post_hooks``. Since torch 1.13 (checked on torch 2.13).
    """
    hooks: MutableMapping[int, Any] = module._load_state_dict_post_hooks
    return hooks


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp...) is running.

    Why: the box paths call autograd Functions and in-place conv ops that functorch cannot
    transform; torch exposes the check only as ``torch._C._are_functorch_transforms_active``
    (since torch 2.0, checked on torch 2.13). False where it is missing.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def forward_ad_level() -> int:
    """The innermost forward-mode AD level, -1 outside ``torch.autograd.forward_ad``.

    Why: the hand-written backwards have no forward derivative, so forward-mode AD must
    take the composite path; torch keeps the level in the private
    ``torch.autograd.forward_ad._current_level`` (since torch 1.11, checked on torch 2.13).
    """
    level: int = getattr(torch.autograd.forward_ad, "_current_level", -1)
    return level


def tensor_version(t: Tensor) -> int:
    """The version counter of ``t``, which every in-place edit bumps.

    Why: a plan must see an in-place edit of the mask buffer; ``Tensor._version`` is the
    only way to notice one without comparing values (since torch 0.4, checked on 2.13).
    """
    version: int = t._version
    return version


def view_base(t: Tensor) -> Tensor:
    """The tensor ``t`` is a view of, or ``t`` itself.

    Why: a scratch buffer handed out as a view must be kept as the whole buffer;
    ``Tensor._base`` (since torch 1.0, checked on torch 2.13).
    """
    base = t._base
    return t if base is None else base


def can_add_conv_in_place(x: Tensor) -> bool:
    """Whether :func:`conv_add_` sums in place for ``x`` (float32 on a oneDNN CPU build).

    Why: see :func:`conv_add_`; ``torch._C._get_mkldnn_enabled`` is what
    ``torch.backends.mkldnn.flags(enabled=False)`` switches (checked on torch 2.13).
    """
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and torch._C._get_mkldnn_enabled()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
    )


def conv_add_(
    out: Tensor,
    x: Tensor,
    w: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> None:
    """``out += conv(x, w)``, summed as oneDNN writes the conv's output where it can.

    Why: adding a convolution into an existing channels-last sum saves a pass over the
    output per box; only oneDNN's fused "binary add" op does it, and torch reaches it only
    through the private ``torch.ops.mkldnn._convolution_pointwise_.binary`` (since torch
    2.0, checked on torch 2.13). Elsewhere a plain ``out.add_(conv(...))``.
    """
    if can_add_conv_in_place(x):
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, w, None, padding, stride, dilation, groups, "add", 1.0, None, [], None
        )
        return
    conv = {3: torch.conv1d, 4: torch.conv2d, 5: torch.conv3d}[x.dim()]
    out.add_(conv(x, w, None, stride, padding, dilation, groups))


def convolution_backward(
    grad: Tensor, x: Tensor, w: Tensor, args: tuple[Any, ...], groups: int, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None]:
    """The input and weight gradients of ``conv(x, w, None, *args, groups)``, as ``needs`` says.

    ``args`` are the stride, padding and dilation. No autograd graph is recorded.

    Why: the fused box path needs a convolution's gradients without recording a graph, in
    one call that the conv library runs as its own backward; torch exposes that only as the
    ATen op ``torch.ops.aten.convolution_backward``, outside its documented API
    (``torch.nn.grad.conv*d_input``/``_weight`` make two calls). Since torch 1.11 (checked
    on torch 2.13).
    """
    stride, padding, dilation = args
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups,
        [needs[0], needs[1], False],
    )  # fmt: skip
    return gx, gw


def unsupported_global(error: BaseException) -> str | None:
    """``"Unsupported global: GLOBAL mod.Name"`` from a ``torch.load`` error, else None.

    Why: ``torch.load(weights_only=True)`` reports a class it refuses only inside a long
    :class:`pickle.UnpicklingError` message (two options, a URL); the command line and
    :func:`~maskparam.checkpoint.bake_file` show the one line that matters. The message
    reads ``... WeightsUnpickler error: Unsupported global: GLOBAL mod.Name was not an
    allowed global by default ...`` since torch 2.4 (checked on torch 2.13).
    """
    for line in str(error).splitlines():
        if "Unsupported global" in line:
            return line.strip().split(" was not an allowed global")[0].split("error: ")[-1]
    return None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's sharded parameters are).

    Public API (``torch.distributed.tensor.DTensor``), kept here beside :func:`local_shard`
    because torch builds without distributed support have no such module.
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (global-shaped, or broadcasting to it) this rank holds of ``like``.

    Why: an optimizer step writes a sharded parameter through its local shard, and the
    values to keep under a mask must be cut the same way. DTensor has no public call for
    the offset of the local shard. Since torch 2.13:
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        like.shape,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
    )
    # ``full`` may broadcast (size 1 where ``like`` is larger): those dims are not cut.
    full = full.reshape((1,) * (len(shape) - full.dim()) + tuple(full.shape))
    index = tuple(
        slice(None) if whole == 1 else slice(start, start + size)
        for whole, start, size in zip(full.shape, offset, shape, strict=True)
    )
    return full[index]
