"""The compiled active-tap kernel: stride-1 float32 convolutions on x86-64 CPUs with AVX-512.

:mod:`maskparam.taps` runs a masked conv through :class:`TapKernel` when :func:`applies`;
otherwise box by box. The C source, ``_tapconv.c`` beside this file, is compiled at first use
with the system's C compiler (``$CC``, else ``cc``), ``-O3 -march=native -fopenmp``, into a
cache folder, and loaded with :mod:`ctypes`: no build step at install time, and nothing to
download. It computes, for every output position, only the active taps, in the layout torch
gives by default, so unlike the boxes it needs no channels-last copies of the input, output
or gradient, and it sums all the taps of a position in one pass.

Without a compiler, or on a CPU without AVX-512, :func:`library` is None (:func:`status`
says why) and the boxes run instead. ``MASKPARAM_TAP_KERNEL=0`` turns the kernel off;
``MASKPARAM_CACHE_DIR`` chooses where the compiled library is kept (by default
``$XDG_CACHE_HOME/maskparam``, else ``~/.cache/maskparam``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["TapKernel", "applies", "library", "status"]

SOURCE = Path(__file__).with_name("_tapconv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib": the loaded library or None; "why": the reason if None


def status() -> str:
    """``"ready"``, or why the kernel is not used here (loading it first if need be)."""
    library()
    return "ready" if _state.get("lib") is not None else str(_state.get("why"))


def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded once per process; None where it cannot be used."""
    if "lib" in _state:
        lib: ctypes.CDLL | None = _state["lib"]
        return lib
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except _Unavailable as reason:
                _state["lib"], _state["why"] = None, str(reason)
            except OSError as error:  # the source unreadable, say: never fail the caller
                _state["lib"], _state["why"] = None, f"it cannot be loaded: {error}"
    lib = _state["lib"]
    return lib


class _Unavailable(Exception):
    pass


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _load() -> ctypes.CDLL:
    if os.environ.get("MASKPARAM_TAP_KERNEL", "1") == "0":
        raise _Unavailable("MASKPARAM_TAP_KERNEL=0 turns it off")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise _Unavailable(f"it needs an x86-64 CPU, not {platform.machine()}")
    flags = _cpu_flags()
    if "avx512f" not in flags.split():
        raise _Unavailable("it needs a CPU with AVX-512")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise _Unavailable("no C compiler found (set CC to one)")
    source = SOURCE.read_bytes()
    # -march=native: the library is for this CPU only, so its flags are part of the key.
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), flags.encode()])
    ).hexdigest()[:16]
    path = _cache_dir() / f"tapconv-{key}.so"
    if not path.exists():
        _compile(compiler, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise _Unavailable(f"the compiled kernel does not load: {error}") from None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    common = [size] * 8 + [pointer, ctypes.c_int]
    for name in ("tap_forward", "tap_weight_grad"):
        fn = getattr(lib, name)
        fn.argtypes = [pointer] * 4 + common
        fn.restype = ctypes.c_int
    return lib


def _cache_dir() -> Path:
    base = os.environ.get("MASKPARAM_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maskparam"


def _compile(compiler: str, path: Path) -> None:
    """Compile to a temporary name, then rename: another process may be doing the same."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise _Unavailable(f"cannot write the compiled kernel to {path.parent}: {error}") from None
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise _Unavailable(f"{Path(compiler).name} failed to compile it: {detail}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"compiling it failed: {error}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- when it applies ------------------------------------------------------------------------


def applies(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    groups: int,
    out_size: Sequence[int],
    out_cl: bool,
    taps: int,
) -> bool:
    """Whether :class:`TapKernel` runs this batched (and, for 1-D, lifted) conv.

    Stride 1, one group, float32 on the CPU outside autocast (which would run the dense
    conv in lower precision), input contiguous (not channels-last), and output planes (the
    last two axes) as large as the input's, as with "same" padding; and a weight gradient
    whose per-thread sums fit in :data:`MAX_SCRATCH` bytes.
    """
    return (
        x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == w.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and groups == 1
        and all(s == 1 for s in stride)
        and not out_cl
        and x.is_contiguous()
        and x.numel() > 0
        and tuple(out_size[-2:]) == tuple(x.shape[-2:])
        and all(n > 0 for n in out_size)
        and _scratch_bytes(x.shape[1], w.shape[0], taps) <= MAX_SCRATCH
        # Under torch.compile, only a kernel loaded already: no build inside a trace.
        and (_state.get("lib") if torch.compiler.is_compiling() else library()) is not None
    )


MAX_SCRATCH = 256 << 20
"""The most memory, per thread, the weight gradient's partial sums may take."""


def _scratch_bytes(c_in: int, c_out: int, taps: int) -> int:
    """Per thread, the weight gradient's partial sums (as ``tap_weight_grad`` picks)."""
    if c_out % 16 == 0 and c_out >= 32:  # channels in the lanes: one float per sum
        return 4 * ((c_in + 12) * taps * c_out + c_out)
    return 4 * 16 * (c_in * taps + 2) * -(-c_out // 8) * 8  # a vector of 16 per sum


@functools.lru_cache(maxsize=256)
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


# -- the autograd function ------------------------------------------------------------------


def _as_planes(t: Tensor) -> Tensor:
    """A contiguous (N, C, *spatial) tensor as (N, C, D, H, W)."""
    while t.dim() < 5:
        t = t.unsqueeze(2)
    return t


def _pack(w: Tensor, index: Tensor, round_to: int, order: tuple[int, int, int]) -> Tensor:
    """The active taps of ``w``, (O, C_in, T), permuted by ``order``, the last dim padded."""
    taps = w.flatten(2).index_select(2, index)  # (O, C, T)
    packed = taps.permute(*order)
    pad = -packed.shape[2] % round_to
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(status_code: int) -> None:
    if status_code != 0:
        raise MemoryError("maskparam's tap kernel ran out of memory")


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "the tap kernel runs only where applies() said it does"
    return lib


def conv(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    index: Tensor,
    out_size: Sequence[int],
) -> Tensor:
    """The conv's output: ``(N, O, *out_size)``, contiguous (no autograd)."""
    planes = _as_planes(x)
    n, c, d, h, width = planes.shape
    o = w.shape[0]
    d_out = out_size[0] if len(out_size) == 3 else 1
    wp = _pack(w.detach(), index, 8, (2, 1, 0))
    b = None
    if bias is not None:
        b = torch.nn.functional.pad(bias.detach(), (0, wp.shape[2] - o)).contiguous()
    y = torch.empty((x.shape[0], o, *out_size), dtype=x.dtype)
    _check(
        _lib().tap_forward(
            planes.data_ptr(), wp.data_ptr(), None if b is None else b.data_ptr(),
            y.data_ptr(), n, c, d, h, width, o, d_out, offsets.shape[0], offsets.data_ptr(),
            _threads(),
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of input, weight and bias that ``needs`` asks for (no autograd)."""
    need_x, need_w, need_b = needs
    lib = _lib()
    g = grad.contiguous()
    gp, xp = _as_planes(g), _as_planes(x)
    n, o, d_out, h, width = gp.shape
    c, d = xp.shape[1], xp.shape[2]
    t = offsets.shape[0]
    grad_x = grad_w = grad_b = None
    if need_x:
        wpb = _pack(w.detach(), index, 8, (2, 0, 1))
        grad_x = torch.empty(x.shape, dtype=x.dtype)
        back = (-offsets).contiguous()
        _check(
            lib.tap_forward(
                gp.data_ptr(), wpb.data_ptr(), None, grad_x.data_ptr(),
                n, o, d_out, h, width, c, d, t, back.data_ptr(), _threads(),
            )
        )  # fmt: skip
    if need_w or need_b:
        gwp = torch.empty((c, t, o), dtype=x.dtype)
        gb = torch.empty(o, dtype=x.dtype) if need_b else None
        _check(
            lib.tap_weight_grad(
                xp.data_ptr(), gp.data_ptr(), gwp.data_ptr(),
                None if gb is None else gb.data_ptr(),
                n, c, d, h, width, o, d_out, t, offsets.data_ptr(), _threads(),
            )
        )  # fmt: skip
        if need_w:
            grad_w = torch.zeros(w.shape, dtype=w.dtype)
            grad_w.view(w.shape[0], w.shape[1], -1)[:, :, index] = gwp.permute(2, 0, 1)
        grad_b = gb
    return grad_x, grad_w, grad_b


class TapKernel(torch.autograd.Function):
    """The conv by the compiled kernel, forward and backward, in eager mode.

    Apply as ``TapKernel.apply(x, w, bias, offsets, index, out_size, composite_args)``:
    the batched contiguous input (1-D lifted to 2-D), the masked weight (lifted alike),
    the bias or None, the offsets and kernel indices from :func:`tap_table`, the output's
    spatial size, and ``(layout, out_cl, composite)`` for a double backward, which
    differentiates the boxes as ordinary torch operations instead. Under
    :func:`torch.compile`, :func:`compiled_conv` runs the same kernel as a custom op.
    """

    # The ctx-first form: a separate setup_context makes every call bind its signature.
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        offsets: Tensor,
        index: Tensor,
        out_size: tuple[int, ...],
        composite_args: tuple[Any, bool, Callable[..., Tensor]],
    ) -> Tensor:
        ctx.layout, ctx.out_cl, ctx.composite = composite_args
        ctx.offsets, ctx.index = offsets, index
        ctx.save_for_backward(x, w, bias)
        return conv(x, w, bias, offsets, index, out_size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a graph of the gradients is wanted
            from maskparam._taps_kernels import _composite_grads

            grads = _composite_grads(ctx, grad, x, w, bias)
            return (*grads[:3], None, None, None, None)
        needs = ctx.needs_input_grad[:3]
        grads = conv_backward(grad, x, w, ctx.offsets, ctx.index, needs)
        return (*grads, None, None, None, None)


# -- under torch.compile: the same kernel as custom ops ----------------------------------------


_tap_conv_op = torch.library.custom_op(
    "maskparam::tap_conv",
    conv,
    mutates_args=(),
    schema="(Tensor x, Tensor w, Tensor? bias, Tensor offsets, Tensor index, "
    "SymInt[] out_size) -> Tensor",
)


@_tap_conv_op.register_fake
def _(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    index: Tensor,
    out_size: Sequence[int],
) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0], *out_size))


@torch.library.custom_op(
    "maskparam::tap_conv_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor w, Tensor offsets, Tensor index, bool[] needs) "
    "-> (Tensor, Tensor, Tensor)",
)
def _tap_conv_backward_op(
    grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor, index: Tensor, needs: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    grads = conv_backward(grad, x, w, offsets, index, needs)
    # A custom op returns tensors: an empty one stands for a gradient not asked for.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


@_tap_conv_backward_op.register_fake
def _(
    grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor, index: Tensor, needs: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    shapes = (x.shape, w.shape, (w.shape[0],))
    return tuple(  # type: ignore[return-value]
        x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True)
    )


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


_tap_conv_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_conv(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    offsets: Tensor,
    index: Tensor,
    out_size: Sequence[int],
) -> Tensor:
    """The kernel as one custom op, ``maskparam::tap_conv``, that torch.compile can trace.

    Differentiable once (torch.compile supports no double backward anyway).
    """
    out: Tensor = _tap_conv_op(x, w, bias, offsets, index, list(out_size))
    return out
