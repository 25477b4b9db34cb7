"""Native CPU kernels, built once with the system C++ compiler and called through ctypes.

No torch headers and no build step at install time: the C++ source is compiled on first use into
a per-user cache (``~/.cache/tandem/kernels``, keyed by source, flags and CPU), which takes about a
second. Where no compiler is present the engine keeps its pure-torch path and logs why, once.
Set ``TANDEM_NATIVE_KERNELS=0`` to force the torch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    from engine.prepare import cache_root  # the models' cache root ($TANDEM_CACHE)

    return cache_root() / "kernels"


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instruction sets (shared home dirs).
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    return flags


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(),
                 _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"paged_attention-{key.hexdigest()[:16]}.so"


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent actors never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build {_SOURCE.name}: {done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL:
    """The compiled kernel library (built on first call). Raises KernelUnavailable."""
    if os.environ.get("TANDEM_NATIVE_KERNELS", "1") == "0":
        raise KernelUnavailable("disabled by TANDEM_NATIVE_KERNELS=0")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++) on PATH")
    target = _library_path(compiler)
    if not target.exists():
        _build(target, compiler)
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64]
    return lib


@functools.cache
def available() -> bool:
    """True when the kernels load; logs the reason once when they do not."""
    try:
        load()
        return True
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as exc:
        log.warning("native CPU kernels unavailable, using torch attention: %s", exc)
        return False
