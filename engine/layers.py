"""Building blocks of the Llama-family decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Numerics follow the transformers reference (norm in fp32, rope tables in fp32 cast to the
activation dtype) so greedy fp32 decoding is token-exact with it. The elementwise steps run fused
on CPU (``engine.fused``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from tandem.engine.config import ModelConfig, RopeScaling
from tandem.engine.fused import add_rms_norm, silu_mul


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm(x); with ``residual``, first ``x += residual`` in place (x is the residual
        stream, so the add and the norm are one pass)."""
        return add_rms_norm(x, self.weight, self.eps, residual)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth band between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (rotate-half convention)."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        dim = config.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (config.rope_theta**exponent)
        if config.rope_scaling.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, config.rope_scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``positions`` ([T]) as ``[T, 1, D]`` in ``dtype``: built once per step, shared
        by every layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


# Most bytes of fused gate/up activation one MLP pass makes (counted in fp32, which the CPU paths
# compute in): a large prefill's is beyond the largest block glibc's malloc recycles (32 MB), so it
# was a fresh mmap every layer, faulted in page by page; in chunks it is recycled
# (benchmarks/RESULTS.md, "engine/layers.py").
MLP_CHUNK_BYTES = 24 << 20


class SwiGLU(nn.Module):
    """gate and up projections fused into one matmul; silu(gate) * up, then down."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.chunk_rows = max(1, MLP_CHUNK_BYTES // (2 * intermediate * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.chunk_rows
        if x.shape[0] <= rows:
            return self._rows(x)
        # Each token's MLP is independent of the others': row chunks change nothing but memory.
        return torch.cat([self._rows(x[start:start + rows]) for start in range(0, x.shape[0], rows)])

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every ``nn.Linear`` in ``model`` by ``make(linear)``; returns how many.

    Call after the weights are loaded: the replacements hold copies that do not follow later
    weight updates (or ties).
    """
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)
