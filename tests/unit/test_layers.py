"""Decoder building blocks (engine/layers.py) against float64 formulas."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine.layers import SwiGLU


@pytest.mark.parametrize("rows", [5, 64, 203])
def test_swiglu_in_row_chunks_is_the_mlp_of_every_row(rows) -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(48, 80)
    mlp.chunk_rows = 64  # 203 rows: three full chunks and a partial one
    x = torch.randn(rows, 48)
    with torch.no_grad():
        got = mlp(x)
        w, d, x64 = mlp.gate_up_proj.weight.double(), mlp.down_proj.weight.double(), x.double()
        gate, up = (x64 @ w.T).chunk(2, dim=-1)
        want = (F.silu(gate) * up) @ d.T
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_swiglu_chunks_keep_the_gate_up_activation_under_glibcs_recycled_size() -> None:
    # SmolLM2's MLP: 2048 rows of 2 x 1536 fp32 (24 MB) per pass, not 4096 rows at once (50 MB).
    assert SwiGLU(576, 1536).chunk_rows == 2048
