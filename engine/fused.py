"""Fused elementwise steps of a decoder layer (``engine/kernels/elementwise.cpp``), with the torch
code they replace as the fallback (other devices or dtypes, or no compiler).

Each fused step is one pass over the activations instead of 3-8 torch ops; the numerics are the
torch code's (see the kernel's header), so fp32 stays within rounding of transformers.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from tandem.engine import kernels

FUSED_DTYPES = (torch.float32, torch.bfloat16)


def fused_applies(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one fused dtype, contiguous in their last dimension, and the kernels built."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in FUSED_DTYPES
            and all(t.dtype == first.dtype and t.stride(-1) == 1 for t in tensors) and kernels.available())


def _check(status: int, what: str, *shapes: torch.Size) -> None:
    if status != 0:
        raise RuntimeError(f"fused {what} rejected its inputs (status {status}): {[tuple(s) for s in shapes]}")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference numerics: normalise in fp32, round to x's dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x += residual`` in place (when given), then RMSNorm(x). ``x`` is the residual stream."""
    operands = (x, weight) if residual is None else (x, weight, residual)
    if not (fused_applies(*operands) and x.is_contiguous() and (residual is None or residual.is_contiguous())):
        if residual is not None:
            x.add_(residual)
        return rms_norm_torch(x, weight, eps)
    out = torch.empty_like(x)
    cols = x.shape[-1]
    status = kernels.load().fused_add_rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        x.numel() // cols, cols, eps, x.dtype == torch.bfloat16, torch.get_num_threads())
    _check(status, "add + RMSNorm", x.shape, weight.shape)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_(rows: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first ``heads`` heads of each row of ``rows`` ([T, width]) in place by the step's
    tables (``cos``/``sin`` [T, 1, D] or [T, D], rotate-half convention)."""
    dim = cos.shape[-1]
    tokens = rows.shape[0]
    cos2, sin2 = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
    if not (fused_applies(rows, cos2, sin2) and cos2.is_contiguous() and sin2.is_contiguous()):
        x = rows[:, : heads * dim].view(tokens, heads, dim)
        x.copy_(x * cos.view(tokens, 1, dim) + rotate_half(x) * sin.view(tokens, 1, dim))
        return
    status = kernels.load().fused_rope(rows.data_ptr(), rows.stride(0), tokens, heads, dim, cos2.data_ptr(),
                                       sin2.data_ptr(), rows.dtype == torch.bfloat16, torch.get_num_threads())
    _check(status, "rope", rows.shape, cos.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` = [gate | up] along the last dimension."""
    inter = gate_up.shape[-1] // 2
    if not (fused_applies(gate_up) and gate_up.is_contiguous()):
        gate, up = gate_up.split(inter, dim=-1)
        return F.silu(gate) * up
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    status = kernels.load().fused_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter),
                                           inter, gate_up.dtype == torch.bfloat16, torch.get_num_threads())
    _check(status, "silu * up", gate_up.shape)
    return out


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a 2-D tensor (int64), natively for contiguous fp32 on CPU:
    the same indices (first of ties; a row with a NaN gives its first NaN), several times faster."""
    if not (logits.dim() == 2 and logits.dtype == torch.float32 and fused_applies(logits)
            and logits.is_contiguous() and logits.shape[1] > 0):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    status = kernels.load().argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(),
                                        torch.get_num_threads())
    _check(status, "argmax", logits.shape)
    return out
