"""The compiled active-tap kernel: stride-1 float32 convs on x86-64 (AVX-512, AVX2) and ARM64.

:mod:`maskparam.taps` runs a masked conv through :class:`TapKernel` when :func:`applies`;
otherwise box by box. The C source, ``tapconv.c`` beside this file, is written once with
vector extensions and compiled at first use for one instruction set (:data:`ISAS`: the best
the CPU has, or ``MASKPARAM_TAP_ISA``) with the system's C compiler (``$CC``, else ``cc``)
into a cache folder, and loaded with :mod:`ctypes`: no build step at install time, and
nothing to download. It computes, for every output position, only the active taps, in the
layout torch gives by default, so unlike the boxes it needs no channels-last copies of the
input, output or gradient, and it sums all the taps of a position in one pass.

The cache trusts nothing it did not build: it loads a library only if the library and its
folder belong to this user (or root) and no one else may write them, and only if the
library answers with the key of the source and flags it was built from. Otherwise it builds
one in a private temporary folder. Without a compiler or a supported CPU, :func:`library` is
None (:func:`status` says why) and the boxes run instead. ``MASKPARAM_TAP_KERNEL=0`` (or
``false``, ``no``, ``off``) turns the kernel off; ``MASKPARAM_CACHE_DIR`` chooses where the
compiled library is kept (by default ``$XDG_CACHE_HOME/maskparam``, else
``~/.cache/maskparam``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FLAGS",
    "ISAS",
    "Geometry",
    "TapKernel",
    "applies",
    "cache_path",
    "clear",
    "isa",
    "library",
    "sizes",
    "status",
    "weight_grad_variant",
]

SOURCE = Path(__file__).with_name("tapconv.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast")
"""The compiler flags of every build; :data:`ISAS` adds those of the instruction set."""

ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (("avx512f", "avx2", "fma"), ("-mavx2", "-mfma", "-mavx512f")),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
    "neon": (("asimd",), ()),
}
"""Per instruction set: the CPU flags it needs (from /proc/cpuinfo) and its compiler flags."""

_MACHINE_ISAS = {"x86_64": ("avx512", "avx2"), "amd64": ("avx512", "avx2"),
                 "aarch64": ("neon",), "arm64": ("neon",)}  # fmt: skip
"""Per machine, its instruction sets, the best first."""

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

_lock = threading.Lock()
_state: dict[str, Any] = {}
""""lib": the loaded library or None; "why": the reason if None; "isa": its instruction set;
"note": how it was found, where that is worth saying."""
_warned: set[str] = set()  # environment values warned about once


def status() -> str:
    """``"ready (ISA)"``, or why the kernel is not used here (loading it first if need be).

    ISA is the instruction set the kernel was built for (``avx512``, ``avx2`` or ``neon``),
    followed by how it was found where that matters, for example that it was built in a
    private folder because the cache folder was not trusted.
    """
    library()
    if _state.get("lib") is None:
        return str(_state.get("why"))
    note = _state.get("note")
    return f"ready ({_state['isa']}{'; ' + note if note else ''})"


def isa() -> str | None:
    """The instruction set of the loaded kernel, or None where it does not run."""
    return _state.get("isa") if library() is not None else None


def clear() -> None:
    """Forget the loaded library: the next use finds (or builds) it again, as a new process."""
    with _lock:
        _state.clear()
        _warned.clear()
        _scratch_table.cache_clear()


def library() -> ctypes.CDLL | None:
    """The compiled kernel, loaded once per process; None where it cannot be used."""
    if "lib" in _state:
        lib: ctypes.CDLL | None = _state["lib"]
        return lib
    with _lock:
        if "lib" not in _state:
            try:
                _state.update(_load())
            except _Unavailable as reason:
                _state["lib"], _state["why"] = None, str(reason)
            except OSError as error:  # the source unreadable, say: never fail the caller
                _state["lib"], _state["why"] = None, f"it cannot be loaded: {error}"
    lib = _state["lib"]
    return lib


class _Unavailable(Exception):
    pass


class _Unwritable(_Unavailable):
    """A folder the library cannot be written to: the cache folder's is worked around."""


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _env(name: str, allowed: Sequence[str]) -> str:
    """The variable ``name``, lower case, or "" if unset; a value not allowed warns, is ""."""
    value = os.environ.get(name, "").strip().lower()
    if value and value not in allowed:
        _warn_once(
            f"{name} takes one of {', '.join(allowed)} (any case); "
            f"got {os.environ[name]!r}, which is ignored."
        )
        return ""
    return value


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set(platform.processor().lower().split())


def _choose_isa() -> str:
    """The instruction set to build for: ``MASKPARAM_TAP_ISA``, else the CPU's best."""
    machine = platform.machine().lower()
    candidates = _MACHINE_ISAS.get(machine, ())
    if not candidates:
        raise _Unavailable(f"it needs an x86-64 or ARM64 CPU, not {platform.machine()}")
    flags = _cpu_flags()
    forced = _env("MASKPARAM_TAP_ISA", tuple(ISAS))
    if forced:
        if forced not in candidates:
            raise _Unavailable(
                f"MASKPARAM_TAP_ISA={forced} asks for an instruction set that "
                f"{platform.machine()} CPUs lack"
            )
        missing = [f for f in ISAS[forced][0] if f not in flags]
        if missing:
            raise _Unavailable(
                f"MASKPARAM_TAP_ISA={forced} asks for an instruction set this CPU lacks "
                f"(no {', '.join(missing)} among its flags)"
            )
        return forced
    for name in candidates:
        if all(f in flags for f in ISAS[name][0]):
            return name
    raise _Unavailable("it needs a CPU with AVX-512 or AVX2 and FMA")


_SYMBOLS = (
    "tap_build_key", "tap_isa", "tap_lanes", "tap_out_block", "tap_forward_tile",
    "tap_weight_grad_variant", "tap_weight_grad_scratch", "tap_forward", "tap_weight_grad",
)  # fmt: skip


class Geometry(ctypes.Structure):
    """The C side's ``tap_geometry``: the sizes of one call (see ``tapconv.c``)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("N", "C", "D", "H", "W", "O", "Do", "T")),
        ("taps", ctypes.c_void_p),
        ("nthreads", ctypes.c_int64),
        ("index", ctypes.c_void_p),
        ("kernel", ctypes.c_int64),
        ("input_grad", ctypes.c_int64),
    ]


def _plan() -> tuple[str, str, tuple[str, ...], int]:
    """The instruction set, compiler, flags and build key of the library to load."""
    isa = _choose_isa()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise _Unavailable("no C compiler found (set CC to one)")
    flags = (*FLAGS, *ISAS[isa][1])
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), compiler.encode()]
    key = int.from_bytes(hashlib.sha256(b"\0".join(parts)).digest()[:8], "little") >> 1
    return isa, compiler, flags, key


def cache_path() -> Path:
    """Where the library for this CPU, compiler and environment is cached.

    Raises:
        RuntimeError: If no library can be built here (:func:`status` says why).
    """
    try:
        isa, _, _, key = _plan()
    except _Unavailable as reason:
        raise RuntimeError(f"no tap kernel can be built here: {reason}") from None
    return _cache_dir() / f"tapconv-{isa}-{key:016x}.so"


def _load() -> dict[str, Any]:
    if _env("MASKPARAM_TAP_KERNEL", _ON + _OFF) in _OFF:
        raise _Unavailable(
            f"MASKPARAM_TAP_KERNEL={os.environ['MASKPARAM_TAP_KERNEL']} turns it off"
        )
    isa, compiler, flags, key = _plan()
    name = f"tapconv-{isa}-{key:016x}.so"
    build = functools.partial(_compile, compiler, (*flags, f"-DTAP_BUILD_KEY={key:#x}ULL"))
    directory = _cache_dir()
    why_private = _prepare(directory)
    note = None
    if why_private is None:
        path = directory / name
        if os.path.lexists(path):
            why = _distrust(path, folder=False)
            if why is None:
                lib, why = _check(path, isa, key)
                if lib is not None:
                    return {"lib": lib, "isa": isa}
            note = f"rebuilt {name}: the cached one {why}"
        try:
            return {"lib": _build_in(directory, path, build, isa, key), "isa": isa, "note": note}
        except _Unwritable as error:  # a read-only folder, say
            why_private = str(error)
    # A private folder: nobody else can have put anything there.
    with tempfile.TemporaryDirectory(prefix="maskparam-") as private:
        lib = _build_in(Path(private), Path(private) / name, build, isa, key)
    note = f"built in a private temporary folder, since {why_private}"
    return {"lib": lib, "isa": isa, "note": note}


def _build_in(
    directory: Path, path: Path, build: Callable[[str], None], isa: str, key: int
) -> ctypes.CDLL:
    """Build into a new file in ``directory``, load and check it, then rename it to ``path``.

    Another process may be building the same library: each builds its own file, and the
    rename replaces the library whole.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tapconv-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as error:
        raise _Unwritable(f"{directory} cannot be written ({error.strerror})") from None
    try:
        build(tmp)
        os.chmod(tmp, 0o700)
        lib, why = _check(Path(tmp), isa, key)
        if lib is None:
            raise _Unavailable(f"the library just built {why}")
        os.replace(tmp, path)
        return lib
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check(path: Path, isa: str, key: int) -> tuple[ctypes.CDLL | None, str | None]:
    """The library at ``path`` with its functions typed, or None and what is wrong with it."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"does not load ({error})"
    missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
    if missing:
        return None, f"lacks the symbol {missing[0]}"
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    lib.tap_build_key.restype = ctypes.c_uint64
    lib.tap_isa.restype = ctypes.c_char_p
    for name in ("tap_lanes", "tap_out_block", "tap_forward_tile"):
        getattr(lib, name).restype = size
    lib.tap_weight_grad_variant.restype = ctypes.c_int
    lib.tap_weight_grad_scratch.restype = size
    for name in ("tap_weight_grad_variant", "tap_weight_grad_scratch"):
        getattr(lib, name).argtypes = [size] * 3
    for name in ("tap_forward", "tap_weight_grad"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(Geometry)] + [pointer] * 4
        fn.restype = ctypes.c_int
    built = lib.tap_build_key()
    if built != key:
        return None, f"answers build key {built:#x}, not {key:#x} (another source or flags)"
    if lib.tap_isa().decode() != isa:
        return None, f"is built for {lib.tap_isa().decode()}, not {isa}"
    return lib, None


def _distrust(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` cannot be trusted to hold only what this user put there, or None."""
    info = os.stat(path) if folder else os.lstat(path)  # a link to a library is not trusted
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(info.st_mode):
        return f"is not a plain {'folder' if folder else 'file'}"
    if info.st_uid not in (os.geteuid(), 0):
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}) or root"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by its group or others (mode {stat.S_IMODE(info.st_mode):#o})"
    return None


def _prepare(directory: Path) -> str | None:
    """Create the cache folder (mode 0700) if need be; None if it can be trusted, else why."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        return f"{directory} cannot be created ({error.strerror})"
    why = _distrust(directory, folder=True)
    return None if why is None else f"the folder {directory} {why}"


def _cache_dir() -> Path:
    base = os.environ.get("MASKPARAM_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maskparam"


def _compile(compiler: str, flags: Sequence[str], out: str) -> None:
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", out, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"compiling it failed: {error}") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise _Unavailable(f"{Path(compiler).name} failed to compile it: {detail}")


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
        # Under torch.compile, only a kernel loaded already: no build inside a trace.
        and (_state.get("lib") if torch.compiler.is_compiling() else library()) is not None
        # The weight's sizes, not the input's: they stay plain ints under torch.compile.
        and _scratch_bytes(w.shape[1], w.shape[0], taps) <= MAX_SCRATCH
    )


MAX_SCRATCH = 256 << 20
"""The most memory, per thread, the weight gradient's partial sums may take."""


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
    }


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


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _geometry(
    sizes: tuple[int, ...], offsets: Tensor, index: Tensor, w: Tensor, input_grad: bool = False
) -> Geometry:
    """``sizes``: N, C, D, H, W, O, Do; ``w``: the conv's weight, lifted as the input is."""
    kernel = math.prod(w.shape[2:])
    return Geometry(
        *sizes, offsets.shape[0], offsets.data_ptr(), _threads(),
        index.data_ptr(), kernel, int(input_grad),
    )  # fmt: skip


def _ok(status_code: int) -> None:
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
    """The conv's output: ``(N, O, *out_size)``, contiguous (no autograd).

    The kernel reads ``w`` and ``bias`` as they are: it packs the weight itself.
    """
    planes = _as_planes(x)
    n, c, d, h, width = planes.shape
    w = w.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    y = torch.empty((x.shape[0], w.shape[0], *out_size), dtype=x.dtype)
    d_out = out_size[0] if len(out_size) == 3 else 1
    geometry = _geometry((n, c, d, h, width, w.shape[0], d_out), offsets, index, w)
    _ok(
        _lib().tap_forward(
            ctypes.byref(geometry), planes.data_ptr(), w.data_ptr(),
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of input, weight and bias that ``needs`` asks for (no autograd).

    The kernel writes them in torch's layout: the weight gradient whole, zero off the taps.
    """
    need_x, need_w, need_b = needs
    lib = _lib()
    g = grad.contiguous()
    gp, xp = _as_planes(g), _as_planes(x)
    n, o, d_out, h, width = gp.shape
    c, d = xp.shape[1], xp.shape[2]
    w = w.detach().contiguous()
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = torch.empty(x.shape, dtype=x.dtype)
        # The input gradient is the forward with the taps negated and the weight transposed.
        geometry = _geometry((n, o, d_out, h, width, c, d), offsets, index, w, input_grad=True)
        _ok(
            lib.tap_forward(
                ctypes.byref(geometry), gp.data_ptr(), w.data_ptr(), None, grad_x.data_ptr()
            )
        )
    if need_w or need_b:
        grad_w = torch.empty(w.shape, dtype=w.dtype) if need_w else None
        grad_b = torch.empty(o, dtype=x.dtype) if need_b else None
        geometry = _geometry((n, c, d, h, width, o, d_out), offsets, index, w)
        _ok(
            lib.tap_weight_grad(
                ctypes.byref(geometry), xp.data_ptr(), gp.data_ptr(),
                None if grad_w is None else grad_w.data_ptr(),
                None if grad_b is None else grad_b.data_ptr(),
            )
        )  # fmt: skip
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
    def forward(  # noqa: D102 - the autograd.Function protocol
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
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        x, w, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a graph of the gradients is wanted
            from maskparam.taps.reference import composite_grads as _composite_grads

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
