"""Compile a C source at first use for the CPU's instruction set, keep it in a trusted cache.

A :class:`Plugin` is one C source written with vector extensions. :meth:`Plugin.library`
compiles it for one instruction set (:data:`ISAS`: the best the CPU has, or
``MASKPARAM_TAP_ISA``) with the system's C compiler (``$CC``, else ``cc``) into a cache
folder, and loads it with :mod:`ctypes`: no build step at install time, and nothing to
download. This module knows how to build, check and cache a library; what the library
computes is up to the module that owns it (:mod:`maskparam.taps.kernel`).

The cache trusts nothing it did not build: it loads a library only if the library and its
folder belong to this user (or root) and no one else may write them, and only if the
library answers with the key of the source and flags it was built from (its
``<prefix>_build_key`` and ``<prefix>_isa`` functions). Otherwise it builds one in a private
temporary folder. Without a compiler or a supported CPU, :meth:`Plugin.library` is None
(:meth:`Plugin.status` says why). ``MASKPARAM_TAP_KERNEL=0`` (or ``false``, ``no``,
``off``) turns it off; ``MASKPARAM_CACHE_DIR`` chooses where the compiled library is kept
(by default ``$XDG_CACHE_HOME/maskparam``, else ``~/.cache/maskparam``).
"""

from __future__ import annotations

import ctypes
import hashlib
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
from typing import NamedTuple

__all__ = [
    "FLAGS", "ISAS", "MACHINE_ISAS", "Plugin", "Target", "cache_dir", "cpu_flags",
    "private_folder", "untrusted_file",
]  # fmt: skip

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast")
"""The compiler flags of every build; :data:`ISAS` adds those of the instruction set."""

ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (("avx512f", "avx2", "fma"), ("-mavx2", "-mfma", "-mavx512f")),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
    "neon": (("asimd",), ()),
}
"""Per instruction set: the CPU flags it needs (from /proc/cpuinfo) and its compiler flags."""

MACHINE_ISAS = {"x86_64": ("avx512", "avx2"), "amd64": ("avx512", "avx2"),
                "aarch64": ("neon",), "arm64": ("neon",)}  # fmt: skip
"""Per machine, its instruction sets, the best first."""

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

Declare = Callable[[ctypes.CDLL], None]
"""Gives the functions of a loaded library their argument and result types."""


class Target(NamedTuple):
    """What one build is for: instruction set, compiler, flags, and the key that names it."""

    isa: str
    compiler: str
    flags: tuple[str, ...]
    key: int


class _Unavailable(Exception):
    pass


class _Unwritable(_Unavailable):
    """A folder the library cannot be written to: the cache folder's is worked around."""


class Plugin:
    """One C source, built and loaded at most once per process (until :meth:`clear`).

    Args:
        source: The C file. It must define ``uint64_t <prefix>_build_key(void)``, which
            returns the macro ``TAP_BUILD_KEY``, and ``const char* <prefix>_isa(void)``.
        stem: The start of the library's file name.
        prefix: The prefix of those two functions.
        symbols: Every other function the library must export.
        declare: Types those functions once the library is loaded.
        includes: The files beside ``source`` that it includes: part of the build key, so
            that a change to any of them builds anew.
    """

    def __init__(
        self,
        source: Path,
        stem: str,
        prefix: str,
        symbols: Sequence[str],
        declare: Declare,
        includes: Sequence[Path] = (),
    ) -> None:
        self.source, self.stem, self.prefix = source, stem, prefix
        self.includes = tuple(includes)
        self.symbols = (f"{prefix}_build_key", f"{prefix}_isa", *symbols)
        self._declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._loaded = False
        self._isa: str | None = None
        self._why = ""  # why there is no library
        self._note: str | None = None  # how it was found, where that is worth saying
        self._warned: set[str] = set()  # environment values warned about once

    def library(self) -> ctypes.CDLL | None:
        """The compiled library, loaded once; None where it cannot be used."""
        if self._loaded:
            return self._lib
        with self._lock:
            if not self._loaded:
                try:
                    self._lib, self._isa, self._note = self._load()
                except _Unavailable as reason:
                    self._why = str(reason)
                except OSError as error:  # the source unreadable, say: never fail the caller
                    self._why = f"it cannot be loaded: {error}"
                self._loaded = True
        return self._lib

    def loaded(self) -> ctypes.CDLL | None:
        """The library if it is loaded already; never builds (for use inside a trace)."""
        return self._lib

    def status(self) -> str:
        """``"ready (ISA)"``, or why the library is not used here (loading it first).

        ISA is the instruction set it was built for (``avx512``, ``avx2`` or ``neon``),
        followed by how it was found where that matters, for example that it was built in a
        private folder because the cache folder was not trusted.
        """
        if self.library() is None:
            return self._why
        note = f"; {self._note}" if self._note else ""
        return f"ready ({self._isa}{note})"

    def isa(self) -> str | None:
        """The instruction set of the loaded library, or None where it does not run."""
        return self._isa if self.library() is not None else None

    def clear(self) -> None:
        """Forget the loaded library: the next use finds (or builds) it again."""
        with self._lock:
            self._lib, self._loaded, self._isa, self._why, self._note = None, False, None, "", None
            self._warned.clear()

    def cache_path(self) -> Path:
        """Where the library for this CPU, compiler and environment is cached.

        Raises:
            RuntimeError: If no library can be built here (:meth:`status` says why).
        """
        try:
            target = self.target()
        except _Unavailable as reason:
            raise RuntimeError(f"no tap kernel can be built here: {reason}") from None
        return cache_dir() / self._file_name(target)

    def _file_name(self, target: Target) -> str:
        return f"{self.stem}-{target.isa}-{target.key:016x}.so"

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _env(self, name: str, allowed: Sequence[str]) -> str:
        """The variable ``name``, lower case, or "" if unset; a value not allowed warns, is ""."""
        value = os.environ.get(name, "").strip().lower()
        if value and value not in allowed:
            self._warn_once(
                f"{name} takes one of {', '.join(allowed)} (any case); "
                f"got {os.environ[name]!r}, which is ignored."
            )
            return ""
        return value

    def choose_isa(self) -> str:
        """The instruction set to build for: ``MASKPARAM_TAP_ISA``, else the CPU's best."""
        machine = platform.machine().lower()
        candidates = MACHINE_ISAS.get(machine, ())
        if not candidates:
            raise _Unavailable(f"it needs an x86-64 or ARM64 CPU, not {platform.machine()}")
        flags = cpu_flags()
        forced = self._env("MASKPARAM_TAP_ISA", tuple(ISAS))
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

    def target(self) -> Target:
        """What the library for this CPU, compiler and environment is built for."""
        isa = self.choose_isa()
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise _Unavailable("no C compiler found (set CC to one)")
        flags = (*FLAGS, *ISAS[isa][1])
        sources = [path.read_bytes() for path in (self.source, *self.includes)]
        parts = [*sources, " ".join(flags).encode(), compiler.encode()]
        key = int.from_bytes(hashlib.sha256(b"\0".join(parts)).digest()[:8], "little") >> 1
        return Target(isa, compiler, flags, key)

    def _load(self) -> tuple[ctypes.CDLL, str, str | None]:
        """The library, its instruction set, and a note on how it was found (or None)."""
        if self._env("MASKPARAM_TAP_KERNEL", _ON + _OFF) in _OFF:
            raise _Unavailable(
                f"MASKPARAM_TAP_KERNEL={os.environ['MASKPARAM_TAP_KERNEL']} turns it off"
            )
        target = self.target()
        name = self._file_name(target)
        directory = cache_dir()
        why_private = _make_private_folder(directory)
        note = None
        if why_private is None:
            path = directory / name
            if os.path.lexists(path):
                why = _distrust(path, folder=False)
                if why is None:
                    lib, why = self._check(path, target)
                    if lib is not None:
                        return lib, target.isa, None
                note = f"rebuilt {name}: the cached one {why}"
            try:
                return self._build_in(directory, path, target), target.isa, note
            except _Unwritable as error:  # a read-only folder, say
                why_private = str(error)
        # A private folder: nobody else can have put anything there.
        with tempfile.TemporaryDirectory(prefix="maskparam-") as private:
            lib = self._build_in(Path(private), Path(private) / name, target)
        return lib, target.isa, f"built in a private temporary folder, since {why_private}"

    def _build_in(self, directory: Path, path: Path, target: Target) -> ctypes.CDLL:
        """Build into a new file in ``directory``, load and check it, then rename it to ``path``.

        Another process may be building the same library: each builds its own file, and the
        rename replaces the library whole.
        """
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.stem}-", suffix=".so", dir=directory)
            os.close(fd)
        except OSError as error:
            raise _Unwritable(f"{directory} cannot be written ({error.strerror})") from None
        try:
            flags = (*target.flags, f"-DTAP_BUILD_KEY={target.key:#x}ULL")
            _compile(target.compiler, flags, self.source, tmp)
            os.chmod(tmp, 0o700)
            lib, why = self._check(Path(tmp), target)
            if lib is None:
                raise _Unavailable(f"the library just built {why}")
            os.replace(tmp, path)
            return lib
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _check(self, path: Path, target: Target) -> tuple[ctypes.CDLL | None, str | None]:
        """The library at ``path`` with its functions typed, or None and what is wrong with it."""
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            return None, f"does not load ({error})"
        missing = [name for name in self.symbols if not hasattr(lib, name)]
        if missing:
            return None, f"lacks the symbol {missing[0]}"
        build_key = getattr(lib, f"{self.prefix}_build_key")
        build_key.restype = ctypes.c_uint64
        isa = getattr(lib, f"{self.prefix}_isa")
        isa.restype = ctypes.c_char_p
        built = build_key()
        if built != target.key:
            return (
                None,
                f"answers build key {built:#x}, not {target.key:#x} (another source or flags)",
            )
        if isa().decode() != target.isa:
            return None, f"is built for {isa().decode()}, not {target.isa}"
        self._declare(lib)
        return lib, None


def cpu_flags() -> set[str]:
    """The CPU's feature flags, as ``/proc/cpuinfo`` lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set(platform.processor().lower().split())


def cache_dir() -> Path:
    """``$MASKPARAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/maskparam``, or ``~/.cache/maskparam``."""
    base = os.environ.get("MASKPARAM_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maskparam"


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


def private_folder(directory: Path) -> str | None:
    """Create ``directory`` (mode 0700) if need be: None if it can be trusted, else why not.

    Trusted: a folder that belongs to this user (or root) and no one else may write.
    """
    return _make_private_folder(directory)


def untrusted_file(path: Path) -> str | None:
    """Why the file at ``path`` cannot be trusted, or None if it can.

    Trusted: a plain file (not a link) of this user's (or root's) that no one else may
    write. Raises OSError if there is none.
    """
    return _distrust(path, folder=False)


def _make_private_folder(directory: Path) -> str | None:
    """Create the cache folder (mode 0700) if need be; None if it can be trusted, else why."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        return f"{directory} cannot be created ({error.strerror})"
    why = _distrust(directory, folder=True)
    return None if why is None else f"the folder {directory} {why}"


def _compile(compiler: str, flags: Sequence[str], source: Path, out: str) -> None:
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", out, str(source)],
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
