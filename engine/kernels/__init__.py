"""Native CPU kernels, built once with the system C++ compiler and called through ctypes.

Kernels: paged decode attention (bf16/fp32, ``paged_attention.cpp``), causal prefill attention
(``prefill_attention.cpp``), the fused elementwise steps
of ``engine.fused`` (``elementwise.cpp``) and the small-M GEMM behind
``engine.kernel_linear`` (``small_gemm.cpp``). No torch headers and no build step at install time:
the C++ sources are compiled on first use into one library in a per-user cache
(``~/.cache/tandem/kernels``, keyed by sources, flags and CPU), which takes a few seconds. Where no
compiler is present the engine keeps its pure-torch path and logs why, once.
Set ``TANDEM_NATIVE_KERNELS=0`` to force the torch path. Kernels split their work over torch's
OpenMP threads (``pool.h``), so set ``OMP_WAIT_POLICY=ACTIVE`` where the engine owns its cores.
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

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("paged_attention.cpp", "prefill_attention.cpp",
                                                                  "small_gemm.cpp", "elementwise.cpp"))
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("numeric.h", "pool.h"))
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17", "-pthread")
# Kernels split their work over OpenMP threads: torch's own runtime (its bundled libgomp.so.1, already
# loaded, satisfies the library's libgomp.so.1), so kernels and torch ops share one pool of threads,
# which a spinning wait policy keeps awake between calls. Without OpenMP: pool.h's own threads.
_OPENMP = ("-fopenmp",)
_VECTOR_MATH = ("-lmvec", "-lm")  # glibc's vector expf, where the C library has it
# Tried in order until one builds: a toolchain without OpenMP or without glibc's vector math
# (then scalar expf) gets the variants without them.
_VARIANTS = ((*_OPENMP, *_VECTOR_MATH), _OPENMP + ("-DTANDEM_NO_MVEC",), _VECTOR_MATH, ("-DTANDEM_NO_MVEC",))


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    from tandem.engine.prepare import cache_root  # the models' cache root ($TANDEM_CACHE)

    return cache_root() / "kernels"


def cpuinfo_field(name: str) -> str:
    """The value of /proc/cpuinfo's first ``name`` line (e.g. vendor_id, flags); "" where absent."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instruction sets (shared home dirs).
    return cpuinfo_field("flags") or os.uname().machine


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    texts = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    for part in (*texts, repr((_FLAGS, _VARIANTS)).encode(), compiler.encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"tandem-kernels-{key.hexdigest()[:16]}.so"


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent actors never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        sources = [str(src) for src in _SOURCES]
        for extra in _VARIANTS:
            done = subprocess.run([compiler, *_FLAGS, *sources, *extra, "-o", tmp],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            names = ", ".join(src.name for src in _SOURCES)
            raise KernelUnavailable(f"{compiler} failed to build {names}: {done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare_elementwise(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "fused_add_rms_norm": [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i64, i64],
        "fused_rope": [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64],
        "fused_silu_mul": [ptr, ptr, i64, i64, i64, i64],
        "argmax_rows": [ptr, i64, i64, ptr, i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes


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
    for fn in (lib.paged_decode_attention_bf16, lib.paged_decode_attention_f32):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64]
    gemm = lib.small_gemm
    gemm.restype = ctypes.c_int
    gemm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_void_p] + [ctypes.c_int64] * 4
    lib.small_gemm_panel_width.restype = ctypes.c_int
    prefill = lib.prefill_attention
    prefill.restype = ctypes.c_int
    prefill.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
    lib.prefill_attention_lanes.restype = ctypes.c_int
    lib.kernels_use_openmp.restype = ctypes.c_int
    _declare_elementwise(lib)
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
