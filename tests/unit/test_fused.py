"""Fused elementwise kernels (engine.fused) against the torch code they replace.

bf16 must be bit-identical (each product and sum rounds where the separate torch ops round);
fp32 rope is bit-identical too, while the norm's mean and silu's expf may differ by an ulp or two.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tandem.engine import fused

pytestmark = pytest.mark.skipif(not fused.fused_applies(torch.zeros(1)), reason="no native kernels here")

DTYPES = [torch.bfloat16, torch.float32]
ROWS = [1, 7, 300]  # decode-sized (one thread) and prefill-sized (split across threads)


def _rope_tables(rows: int, dim: int, dtype: torch.dtype):
    angles = torch.rand(rows, dim // 2) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def _exact_or_close(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_add_rms_norm_adds_in_place_and_normalises(dtype, rows) -> None:
    torch.manual_seed(rows)
    x, delta = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    weight = (torch.rand(576) + 0.5).to(dtype)
    stream = x.clone()
    got = fused.add_rms_norm(stream, weight, 1e-5, residual=delta)
    assert torch.equal(stream, x + delta)
    _exact_or_close(got, fused.rms_norm_torch(x + delta, weight, 1e-5), exact=dtype == torch.bfloat16)
    _exact_or_close(fused.add_rms_norm(x.clone(), weight, 1e-5), fused.rms_norm_torch(x, weight, 1e-5),
                    exact=dtype == torch.bfloat16)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(dtype, rows) -> None:
    torch.manual_seed(rows)
    heads, dim = 12, 64  # 9 query + 3 key heads, then 3 value heads
    qkv = torch.randn(rows, (heads + 3) * dim).to(dtype)
    cos, sin = _rope_tables(rows, dim, dtype)
    qk = qkv[:, : heads * dim].view(rows, heads, dim)
    want = qk * cos + fused.rotate_half(qk) * sin
    got = qkv.clone()
    fused.rope_(got, heads, cos, sin)
    assert torch.equal(got[:, : heads * dim].view(rows, heads, dim), want)
    assert torch.equal(got[:, heads * dim:], qkv[:, heads * dim:])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_silu_mul(dtype, rows) -> None:
    torch.manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536) * 4).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    _exact_or_close(fused.silu_mul(gate_up), F.silu(gate) * up, exact=dtype == torch.bfloat16)


def test_other_dtypes_and_strided_inputs_take_the_torch_path() -> None:
    """Inputs the kernels do not take still get the right answer (float64 formulas)."""
    x = torch.randn(5, 32, dtype=torch.float16)
    weight = (torch.rand(32) + 0.5).to(torch.float16)
    assert not fused.fused_applies(x, weight)
    x64 = x.double()
    want = weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(fused.add_rms_norm(x.clone(), weight, 1e-6).double(), want, rtol=4e-3, atol=4e-3)
    strided = torch.randn(32, 5).t()  # last dimension not contiguous
    assert not fused.fused_applies(strided)
    gate, up = strided.double().split(16, dim=-1)
    torch.testing.assert_close(fused.silu_mul(strided).double(), gate / (1 + torch.exp(-gate)) * up,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cols", [1, 7, 8, 255, 256, 257, 49152])
def test_argmax_rows_matches_torch_argmax(cols) -> None:
    gen = torch.Generator().manual_seed(cols)
    logits = torch.randn(6, cols, generator=gen)
    logits[1] = 0.0  # all tied: the first index
    if cols > 3:
        logits[2, cols // 2] = logits[2, cols - 1] = 1e3  # a tie across blocks: the first wins
        logits[3, 1] = logits[3, 3] = float("nan")  # torch's rule: the first NaN, however large the rest
        logits[3, 2] = 1e30
        logits[4, cols - 2] = float("inf")
    logits[5] = float("-inf")
    got = fused.argmax_rows(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))


def test_argmax_rows_keeps_torch_for_other_inputs() -> None:
    logits = torch.randn(3, 40)
    assert torch.equal(fused.argmax_rows(logits.t()), logits.t().argmax(dim=-1))  # not contiguous
    assert torch.equal(fused.argmax_rows(logits.double()), logits.argmax(dim=-1))
