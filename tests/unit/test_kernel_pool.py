"""How the kernels run on several threads: torch's OpenMP runtime, and their own pool in a forked
child, which inherits neither OpenMP's threads nor the pool's and must not wait for them forever."""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tandem.engine.kernel_linear import KernelLinear, small_gemm_available

pytestmark = pytest.mark.skipif(not small_gemm_available(), reason="no small GEMM here (needs AVX-512 or AVX2)")


def test_a_forked_child_runs_multithreaded_kernels() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 512)
    layer = KernelLinear(linear)
    x = torch.randn(8, 64)
    want = F.linear(x, linear.weight, linear.bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.testing.assert_close(layer(x), want)  # the parent's pool now has its workers
        pid = os.fork()
    finally:
        torch.set_num_threads(threads)
    if pid == 0:  # child: exit code says whether the kernel ran (on 2 threads) and was right
        torch.set_num_threads(2)
        ok = torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's kernel call did not finish in 60 s (pool deadlock after fork)")


def test_kernels_share_torchs_openmp_runtime() -> None:
    """Built with OpenMP, the kernel library must bind to the libgomp torch already loaded, not
    load a second runtime beside it (two teams of threads would compete for the same cores)."""
    from tandem.engine import kernels

    assert kernels.load().kernels_use_openmp() == 1  # g++ here has OpenMP
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes
