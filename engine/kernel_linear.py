"""Linear layers on the native small-M GEMM (``engine/kernels/small_gemm.cpp``) for CPU decode.

At decode batch sizes MKL's fp32 GEMM runs well below this CPU's FMA peak and memory bandwidth,
and on a CPU without bf16 arithmetic (no AVX512_BF16 or AMX) oneDNN emulates bf16 GEMMs at about a
quarter of fp32 speed. ``KernelLinear`` keeps each weight in the model's dtype packed in the
kernel's panels (``[ceil(out / width), in, width]``), and runs

- rows <= ``SMALL_M`` (decode): the native kernel, fp32 math, reading bf16 weights directly;
- larger batches (prefill): an fp32 GEMM: for fp32 models on a copy of the weight kept for it
  (MKL's, as ``F.linear``, or where it is faster, oneDNN's on a prepacked copy: see
  ``onednn_prefill``), for bf16 ones on the weight unpacked and widened to fp32 for the call (one
  pass over the weight, small next to a prefill-sized GEMM).

bf16 models on CPUs *with* bf16 arithmetic keep oneDNN's prepacked path (``packed_linear``).
"""
from __future__ import annotations

import functools
import threading

import torch
from torch import nn
from torch.nn import functional as F

from tandem.engine import hugepages, kernels
from tandem.engine.packed_linear import onednn_linear

# Up to here the native kernel was at least as fast as MKL (fp32) and faster than emulated bf16
# (benchmarks/decode_linears.py; numbers in benchmarks/RESULTS.md, "engine/kernel_linear.py").
SMALL_M = 256


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 or AMX) for oneDNN to use."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def panel_width() -> int:
    """Output columns per packed panel (small_gemm.cpp's NB: 32 on AVX-512, 16 on AVX2), or 0
    where the kernels did not build or this CPU has neither instruction set."""
    return kernels.load().small_gemm_panel_width() if kernels.available() else 0


@functools.cache
def onednn_prefill() -> bool:
    """Whether fp32 prefill GEMMs go to oneDNN (weights prepacked) rather than MKL: everywhere but
    on Intel CPUs. oneDNN picks its code by instruction set, MKL by vendor too: on AMD CPUs MKL ran
    SmolLM2's prefill shapes well behind oneDNN, on Intel near the FMA peak (benchmarks/RESULTS.md,
    "engine/kernel_linear.py")."""
    return (small_gemm_available() and kernels.cpuinfo_field("vendor_id") != "GenuineIntel"
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def small_gemm_available() -> bool:
    """The kernels built and this CPU has what the small GEMM needs (AVX-512 F/BW, or AVX2 + FMA)."""
    return panel_width() > 0


def kernel_linears_apply(dtype: torch.dtype, device: str) -> bool:
    """fp32 on CPU, and bf16 on a CPU that would otherwise emulate bf16 GEMMs."""
    if device != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.bfloat16 and native_bf16_cpu():
        return False
    return small_gemm_available()


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[ceil(out / width), in, width]`` (the kernel's ``panel_width()``), the
    last panel zero-padded."""
    width = panel_width()
    out_features, in_features = weight.shape
    panels = -(-out_features // width)
    padded = weight.new_zeros(panels * width, in_features)
    padded[:out_features] = weight
    return hugepages.copy_of(padded.view(panels, width, in_features).transpose(1, 2))


def unpack_panels(panels: torch.Tensor, out_features: int, dtype: torch.dtype,
                  into: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``pack_panels``, converted to ``dtype`` in the same pass (into ``into``,
    a ``[panels, width, in]`` buffer, when given)."""
    count, in_features, width = panels.shape
    weight = torch.empty(count, width, in_features, dtype=dtype) if into is None else into
    weight.copy_(panels.transpose(1, 2))
    return weight.view(count * width, in_features)[:out_features]


# bf16 weights unpacked for the large-batch path land in a per-thread buffer per shape, reused
# call to call: a fresh allocation of that size is fresh pages, and faulting them in cost more than
# the copy. Per thread, since the result is consumed before the next call on that thread but two
# engines may step on two threads.
_scratch = threading.local()


def _scratch_for(panels: torch.Tensor) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    count, in_features, width = panels.shape
    key = (count, in_features)
    if key not in buffers:
        buffers[key] = torch.empty(count, width, in_features, dtype=torch.float32)
    return buffers[key]


class KernelLinear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: the weight in the kernel's panels (and, for
    fp32, a copy for large batches: the original weight, or oneDNN's prepacked one)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Buffers, not parameters: a packed copy taken after loading (ties are not followed).
        weight = linear.weight.detach()
        self.register_buffer("panels", pack_panels(weight), persistent=False)
        # fp32 keeps a second copy for large batches: unpacking per call is a pass over every
        # weight per step, too slow at prefill sizes (benchmarks/RESULTS.md). bf16 must be widened
        # per call anyway (CPU without bf16 arithmetic), so it keeps only the panels. The copy is
        # the original weight for MKL or an opaque oneDNN tensor (not a buffer: meaningless to
        # state_dict or .to()).
        fp32 = weight.dtype == torch.float32
        self.onednn_weight = (torch.ops.mkldnn._reorder_linear_weight(weight, None)
                              if fp32 and onednn_prefill() else None)
        self.register_buffer("weight", weight if fp32 and self.onednn_weight is None else None, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias_f32", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= SMALL_M:
            out = self._small(rows.contiguous())
        else:
            out = self._large(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        if x.shape[0] == 0:
            return out
        bias = self.bias_f32
        status = kernels.load().small_gemm(
            x.data_ptr(), x.dtype == torch.bfloat16, self.panels.data_ptr(),
            self.panels.dtype == torch.bfloat16, None if bias is None else bias.data_ptr(),
            out.data_ptr(), x.shape[0], self.in_features, self.out_features, torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"small GEMM rejected its inputs (status {status}): x {tuple(x.shape)}, "
                               f"weight [{self.in_features}, {self.out_features}]")
        return out

    def _large(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_weight is not None and x.dtype == torch.float32:
            return onednn_linear(x, self.onednn_weight, self.bias_f32)
        if self.weight is not None and x.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias_f32)
        weight = unpack_panels(self.panels, self.out_features, torch.float32, _scratch_for(self.panels))
        return dense_fp32(x.float(), weight, self.bias_f32).to(x.dtype)


def dense_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in fp32 through the faster library here (``onednn_prefill``)."""
    return onednn_linear(x, weight, bias) if onednn_prefill() else F.linear(x, weight, bias)

