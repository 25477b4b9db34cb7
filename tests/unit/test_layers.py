"""Decoder building blocks (engine/layers.py) against float64 formulas."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tandem.engine.layers import SwiGLU


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


def test_a_large_batch_makes_no_gate_up_activation_above_glibcs_recycled_size() -> None:
    # SmolLM2's MLP: 4097 rows would be 50 MB of fp32 gate/up at once; glibc recycles <= 32 MB.
    mlp = SwiGLU(576, 1536)
    passes = []
    inner = mlp.gate_up_proj.forward
    mlp.gate_up_proj.forward = lambda x: passes.append(x.shape[0]) or inner(x)
    with torch.no_grad():
        out = mlp(torch.randn(4097, 576))
    assert out.shape == (4097, 576) and sum(passes) == 4097 and len(passes) > 1
    assert max(passes) * 2 * 1536 * 4 <= 32 << 20
