"""The tap kernel as an op: when it takes a call, its ctypes calls, and their autograd.

The C source, ``tapconv.c`` beside this file, computes a stride-1 float32 convolution from
its active taps only, in the layout torch gives by default, summing all the taps of a
position in one pass; :mod:`maskparam.taps.build` compiles and caches it (:data:`PLUGIN`).
This module states when the kernel takes a call (:func:`takes`), calls it
(:func:`conv`, :func:`conv_backward`), and makes it differentiable: :class:`TapKernel` in
eager mode, the custom op ``maskparam::tap_conv`` (:data:`tap_conv`) under
:func:`torch.compile`. Without a compiler or a supported CPU, :func:`library` is None
(:func:`status` says why) and the boxes run instead.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from maskparam import _compat
from maskparam.taps.build import Plugin
from maskparam.taps.memory import is_channels_last, memory_format
from maskparam.taps.plan import eager_cached

__all__ = [
    "CONDITIONS",
    "MAX_SCRATCH",
    "PLUGIN",
    "TUNERS",
    "TapCall",
    "TapKernel",
    "Tuner",
    "cache_path",
    "clear",
    "conv",
    "conv_backward",
    "isa",
    "kernel_status",
    "layer_takes",
    "library",
    "sizes",
    "status",
    "takes",
    "tap_conv",
    "tap_table",
    "tuning",
    "weight_grad_variant",
]


class TapCall(ctypes.Structure):
    """The C side's ``tap_call``: the sizes, taps and threads of one call (see ``tapconv.c``)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("N", "C", "D", "H", "W", "O", "Do", "T")),
        ("taps", ctypes.c_void_p),
        ("nthreads", ctypes.c_int64),
        ("index", ctypes.c_void_p),
        ("kernel", ctypes.c_int64),
        ("input_grad", ctypes.c_int64),
        *((name, ctypes.c_int64) for name in ("layout", "stream", "tile", "chunk")),
    ]


_TUNING_SYMBOLS = ("tap_tile_max", "tap_tile_default", "tap_chunk_default", "tap_streams")


def _declare(lib: ctypes.CDLL) -> None:
    """Type the kernel's functions: what Python reads of them, and what it passes."""
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in ("tap_lanes", "tap_out_block", "tap_forward_tile", *_TUNING_SYMBOLS):
        getattr(lib, name).restype = size
    lib.tap_weight_grad_variant.restype = ctypes.c_int
    lib.tap_weight_grad_scratch.restype = size
    for name in ("tap_weight_grad_variant", "tap_weight_grad_scratch"):
        getattr(lib, name).argtypes = [size] * 3
    for name in ("tap_forward", "tap_weight_grad"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(TapCall)] + [pointer] * 4
        fn.restype = ctypes.c_int


_SYMBOLS = (
    "tap_lanes", "tap_out_block", "tap_forward_tile", "tap_weight_grad_variant",
    "tap_weight_grad_scratch", "tap_forward", "tap_weight_grad", *_TUNING_SYMBOLS,
)  # fmt: skip

_HERE = Path(__file__).parent
PLUGIN = Plugin(
    _HERE / "tapconv.c", "tapconv", "tap", _SYMBOLS, _declare, includes=[_HERE / "tapconv_cl.c"]
)
"""The compiled kernel: built at its first use, then loaded from the cache."""


def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded once per process; None where it cannot be used."""
    return PLUGIN.library()


def status() -> str:
    """``"ready (ISA)"``, or why the kernel is not used here (loading it first if need be)."""
    return PLUGIN.status()


def isa() -> str | None:
    """The instruction set of the loaded kernel, or None where it does not run."""
    return PLUGIN.isa()


def cache_path() -> Path:
    """Where the kernel for this CPU, compiler and environment is cached.

    Raises:
        RuntimeError: If no kernel can be built here (:func:`status` says why).
    """
    return PLUGIN.cache_path()


def clear() -> None:
    """Forget the loaded kernel: the next use finds (or builds) it again, as a new process."""
    PLUGIN.clear()
    _scratch_table.cache_clear()
    for tuner in TUNERS:
        tuner.clear()


def kernel_status() -> str:
    """``"ready (<isa>); tuned ..."`` if the tap kernel runs here, else why not.

    Builds the kernel if need be, and tunes it (``maskparam.taps.tune``): what follows
    ``tuned`` names the choices it made on this CPU, and where they came from.

    The kernel needs a CPU with AVX-512, AVX2 and FMA (x86-64) or NEON (ARM64), and a C
    compiler (``$CC``, else ``cc``); it is compiled once per instruction set, at its first
    use, into a private cache (``$MASKPARAM_CACHE_DIR``, by default ``~/.cache/maskparam``),
    in about a second, and a cached library is loaded only if maskparam can trust it.
    ``MASKPARAM_TAP_KERNEL=0`` switches it off and ``MASKPARAM_TAP_ISA`` forces an
    instruction set. Without it, ``execution="taps"`` runs the boxes: the same results, more
    slowly.

    Example:
        >>> kernel_status()  # doctest: +SKIP
        'ready (avx512); tuned: tile 3, chunk 8192, stream on (timed on this CPU, AMD EPYC)'
    """
    if library() is None or not TUNERS:
        return status()
    return f"{status()}; tuned: {TUNERS[0].settings()}"


# -- when it takes a call ---------------------------------------------------------------------

CONDITIONS = (
    "CPU, float32, stride 1, one group, contiguous or channels-last input, "
    "output planes the size of the input's"
)
"""When the kernel takes a call, in words: :func:`takes` says it in code."""

MAX_SCRATCH = 256 << 20
"""The most memory, per thread, the weight gradient's partial sums may take."""


def layer_takes(module: nn.Module, weight: Tensor) -> bool:
    """Whether the layer suits the kernel, whatever its input; :func:`takes` checks the rest.

    A conv with stride 1, one group and zeros padding mode, a float32 weight on the CPU,
    and a kernel that runs here (under :func:`torch.compile`, one loaded already: no build
    inside a trace).
    """
    return (
        isinstance(module, _compat.ConvNd)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and module.groups == 1
        and all(s == 1 for s in module.stride)
        # The kernel computes "same"-sized planes of unpadded input: zeros padding only.
        and module.padding_mode == "zeros"
        and (PLUGIN.loaded() if torch.compiler.is_compiling() else library()) is not None
    )


def takes(
    module: nn.Module,
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    taps: int,
    out_size: Sequence[int],
    out_cl: bool,
) -> bool:
    """Whether the kernel runs this call: the one statement of when (see :data:`CONDITIONS`).

    Args:
        module: The conv: :func:`layer_takes` it.
        x: The batched input (1-D lifted to 2-D): on the CPU, float32 outside autocast
            (which would run the dense conv in lower precision), contiguous or
            channels-last, not empty.
        w: The masked weight, lifted as ``x`` is.
        bias: The bias or None: float32.
        taps: The number of active taps: the weight gradient's per-thread sums must fit in
            :data:`MAX_SCRATCH` bytes.
        out_size: The output's spatial size: its planes (the last two axes) as large as the
            input's, as with "same" padding, and not empty.
        out_cl: Whether the output is channels-last: then so must the input be (a
            contiguous input with a channels-last weight runs the boxes).
    """
    return (
        layer_takes(module, w)
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        # The kernel reads either layout and writes the output in the one it read.
        and (x.is_contiguous() if not out_cl else is_channels_last(x))
        and x.numel() > 0
        and tuple(out_size[-2:]) == tuple(x.shape[-2:])
        and all(n > 0 for n in out_size)
        # The weight's sizes, not the input's: they stay plain ints under torch.compile.
        and _scratch_bytes(w.shape[1], w.shape[0], taps) <= MAX_SCRATCH
    )


def _scratch_bytes(c_in: int, c_out: int, taps: int) -> int:
    """Per thread, the weight gradient's partial sums, as the loaded kernel says."""
    return _scratch_table(int(c_in), int(c_out), int(taps))


# torch.compile calls it as it traces, rather than tracing into ctypes (since torch 2.3).
_scratch_bytes = torch.compiler.assume_constant_result(_scratch_bytes)  # type: ignore[no-untyped-call]


@functools.lru_cache(maxsize=256)
def _scratch_table(c_in: int, c_out: int, taps: int) -> int:
    return int(_lib().tap_weight_grad_scratch(c_in, c_out, taps))


def weight_grad_variant(c_in: int, c_out: int, taps: int) -> str:
    """Which weight gradient the loaded kernel runs: ``"channels"`` or ``"positions"``."""
    return ("positions", "channels")[_lib().tap_weight_grad_variant(c_in, c_out, taps)]


def sizes() -> dict[str, int]:
    """The loaded kernel's vector lanes and tile sizes, as it reports them."""
    lib = _lib()
    return {
        "lanes": int(lib.tap_lanes()),
        "forward_tile_positions": int(lib.tap_forward_tile()),
        "out_block": int(lib.tap_out_block()),
        "tile_max": int(lib.tap_tile_max()),
        "tile_default": int(lib.tap_tile_default()),
        "chunk_default": int(lib.tap_chunk_default()),
        "streams": int(lib.tap_streams()),
    }


@eager_cached(maxsize=256)
def tap_table(
    taps: tuple[tuple[int, ...], ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    pad_left: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """Offsets and kernel indices of the active kernel positions ``taps`` (2-D or 3-D).

    Returns:
        An int64 (T, 3) tensor: per tap, the offset from an output position to the input
        position it reads, as (plane, row, column); and an int64 (T,) tensor: the tap's
        index in the flattened kernel of shape ``kernel``.
    """
    offsets, index = [], []
    for tap in taps:
        off = [k * d - p for k, d, p in zip(tap, dilation, pad_left, strict=True)]
        offsets.append([0] * (3 - len(off)) + off)
        flat = 0
        for k, size in zip(tap, kernel, strict=True):
            flat = flat * size + k
        index.append(flat)
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


# -- the calls --------------------------------------------------------------------------------


def _as_planes(t: Tensor) -> Tensor:
    """A contiguous (N, C, *spatial) tensor as (N, C, D, H, W)."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def _tap_call(
    sizes: tuple[int, ...],
    offsets: Tensor,
    index: Tensor,
    w: Tensor,
    channels_last: bool,
    tune: tuple[int, int, int],
    input_grad: bool = False,
) -> TapCall:
    """One call's ``tap_call``.

    ``sizes``: N, C, D, H, W, O, Do; ``w``: the conv's weight, lifted as the input is;
    ``tune``: the kernel's (stream, tile, chunk), see :func:`tuning`.
    """
    kernel = math.prod(w.shape[2:])
    threads = max(1, torch.get_num_threads())
    return TapCall(
        *sizes, offsets.shape[0], offsets.data_ptr(), threads,
        index.data_ptr(), kernel, int(input_grad), int(channels_last), *tune,
    )  # fmt: skip


class Tuner(Protocol):
    """What chooses the kernel's tuning: :mod:`maskparam.taps.tune`, which registers itself."""

    def settings(self) -> Any: ...  # noqa: D102 - a Tuning: as_call() and str()
    def clear(self) -> None: ...  # noqa: D102


TUNERS: list[Tuner] = []
"""The tuner, once :mod:`maskparam.taps.tune` is imported (``maskparam.taps`` imports it):
it times the kernel through this module, so this module cannot import it."""


def tuning() -> tuple[int, int, int]:
    """The kernel's tuning on this CPU: (stream, tile, chunk), as ``tap_call`` takes them.

    :func:`maskparam.taps.tune.settings` picks it at the kernel's first call in a process:
    read from its cache, or timed once per CPU; 0s (the kernel's defaults) with
    ``MASKPARAM_TAP_TUNE=0``, or where no tuner is registered.
    """
    return TUNERS[0].settings().as_call() if TUNERS else (0, 0, 0)


def _ok(status_code: int) -> None:
    if status_code != 0:
        raise MemoryError("maskparam's tap kernel ran out of memory")


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "the tap kernel runs only where takes() said it does"
    return lib


def _format(x: Tensor) -> torch.memory_format:
    """The layout the kernel reads ``x`` in, and writes the result in: channels-last or not."""
    return memory_format(x, is_channels_last(x))


def conv(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    index: Tensor,
    out_size: Sequence[int],
    tune: tuple[int, int, int] | None = None,
) -> Tensor:
    """The conv's output: ``(N, O, *out_size)``, in ``x``'s layout (no autograd).

    ``x`` is contiguous or channels-last; the kernel reads ``w`` and ``bias`` as they are:
    it packs the weight itself. ``tune``: as :func:`tuning` says, unless given.
    """
    tune = tuning() if tune is None else tune
    fmt = _format(x)
    planes = _as_planes(x)
    n, c, d, h, width = planes.shape
    w = w.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    y = torch.empty((x.shape[0], w.shape[0], *out_size), dtype=x.dtype, memory_format=fmt)
    d_out = out_size[0] if len(out_size) == 3 else 1
    cl = fmt != torch.contiguous_format
    call = _tap_call((n, c, d, h, width, w.shape[0], d_out), offsets, index, w, cl, tune)
    _ok(
        _lib().tap_forward(
            ctypes.byref(call), planes.data_ptr(), w.data_ptr(),
            None if b is None else b.data_ptr(), y.data_ptr(),
        )
    )  # fmt: skip
    return y


def conv_backward(
    grad: Tensor,
    x: Tensor,
    w: Tensor,
    offsets: Tensor,
    index: Tensor,
    needs: Sequence[bool],
    tune: tuple[int, int, int] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of input, weight and bias that ``needs`` asks for (no autograd).

    The kernel writes them in torch's layout: the input gradient in ``x``'s, the weight
    gradient whole, zero off the taps. ``tune``: as :func:`tuning` says, unless given.
    """
    tune = tuning() if tune is None else tune
    need_x, need_w, need_b = needs
    lib = _lib()
    fmt = _format(x)
    cl = fmt != torch.contiguous_format
    g = grad.contiguous(memory_format=fmt)
    gp, xp = _as_planes(g), _as_planes(x)
    n, o, d_out, h, width = gp.shape
    c, d = xp.shape[1], xp.shape[2]
    w = w.detach().contiguous()
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)
        # The input gradient is the forward with the taps negated and the weight transposed.
        call = _tap_call((n, o, d_out, h, width, c, d), offsets, index, w, cl, tune, True)
        _ok(
            lib.tap_forward(
                ctypes.byref(call), gp.data_ptr(), w.data_ptr(), None, grad_x.data_ptr()
            )
        )
    if need_w or need_b:
        grad_w = torch.empty(w.shape, dtype=w.dtype) if need_w else None
        grad_b = torch.empty(o, dtype=x.dtype) if need_b else None
        call = _tap_call((n, c, d, h, width, o, d_out), offsets, index, w, cl, tune)
        _ok(
            lib.tap_weight_grad(
                ctypes.byref(call), xp.data_ptr(), gp.data_ptr(),
                None if grad_w is None else grad_w.data_ptr(),
                None if grad_b is None else grad_b.data_ptr(),
            )
        )  # fmt: skip
    return grad_x, grad_w, grad_b


# -- the autograd Function, in eager mode -------------------------------------------------------


class TapKernel(torch.autograd.Function):
    """The conv by the compiled kernel, forward and backward, in eager mode.

    Apply as ``TapKernel.apply(x, w, bias, offsets, index, out_size, double_backward)``:
    the batched contiguous input (1-D lifted to 2-D), the masked weight (lifted alike),
    the bias or None, the offsets and kernel indices from :func:`tap_table`, the output's
    spatial size, and ``double_backward(needs, grad, x, w, bias)``: the gradients as a graph
    to differentiate again (the boxes as ordinary torch operations). Under
    :func:`torch.compile`, :data:`tap_conv` runs the same kernel as a custom op.
    """

    # The ctx-first form: a separate setup_context makes every call bind its signature.
    @staticmethod
    def forward(  # noqa: D102 - the autograd.Function protocol
        ctx: Any,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        offsets: Tensor,
        index: Tensor,
        out_size: tuple[int, ...],
        double_backward: Callable[..., tuple[Tensor | None, ...]],
    ) -> Tensor:
        ctx.double_backward = double_backward
        ctx.offsets, ctx.index = offsets, index
        ctx.save_for_backward(x, w, bias)
        return conv(x, w, bias, offsets, index, out_size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, w, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: a graph of the gradients is wanted
            grads = ctx.double_backward(needs, grad, x, w, bias)
        else:
            grads = conv_backward(grad, x, w, ctx.offsets, ctx.index, needs)
        return (*grads[:3], None, None, None, None)


# -- under torch.compile: the same kernel as custom ops ----------------------------------------

_CONV_SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, Tensor offsets, Tensor index, SymInt[] out_size)"
)
_BACKWARD_SCHEMA = "(Tensor grad, Tensor x, Tensor w, Tensor offsets, Tensor index, bool[] needs)"


def _conv_op(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    index: Tensor,
    out_size: Sequence[int],
) -> Tensor:
    return conv(x, w, bias, offsets, index, out_size)


tap_conv = torch.library.custom_op(
    "maskparam::tap_conv", _conv_op, mutates_args=(), schema=f"{_CONV_SCHEMA} -> Tensor"
)
"""The kernel as one custom op, ``maskparam::tap_conv``, that torch.compile traces as one
node: ``tap_conv(x, w, bias, offsets, index, list(out_size))``, as :func:`conv`.
Differentiable once (torch.compile supports no double backward anyway)."""


@tap_conv.register_fake
def _(x: Tensor, w: Tensor, *args: Any) -> Tensor:
    out_size = args[-1]
    return torch.empty(
        (x.shape[0], w.shape[0], *out_size), dtype=x.dtype, device=x.device,
        memory_format=_format(x),
    )  # fmt: skip


def _backward_as_tensors(
    grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor, index: Tensor, needs: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    grads = conv_backward(grad, x, w, offsets, index, needs)
    # A custom op returns tensors: an empty one stands for a gradient not asked for.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


_tap_conv_backward_op = torch.library.custom_op(
    "maskparam::tap_conv_backward",
    _backward_as_tensors,
    mutates_args=(),
    schema=f"{_BACKWARD_SCHEMA} -> (Tensor, Tensor, Tensor)",
)


@_tap_conv_backward_op.register_fake
def _(grad: Tensor, x: Tensor, w: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    needs = args[-1]
    grad_x = torch.empty(
        x.shape if needs[0] else (0,),
        dtype=x.dtype,
        device=x.device,
        memory_format=_format(x) if needs[0] else torch.contiguous_format,
    )
    rest = ((w.shape, needs[1]), ((w.shape[0],), needs[2]))
    others = (x.new_empty(shape if need else (0,)) for shape, need in rest)
    return (grad_x, *others)  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, bias, offsets, index, _ = inputs
    ctx.save_for_backward(x, w, offsets, index)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, w, offsets, index = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    needs[2] = needs[2] and ctx.has_bias
    grads = torch.ops.maskparam.tap_conv_backward(grad, x, w, offsets, index, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None)


tap_conv.register_autograd(_backward, setup_context=_setup_context)
