"""Fused elementwise kernels (engine.fused) against float64 formulas written here.

Accuracy: each result is within the rounding error its dtype allows of the exact (float64) value,
a bound derived per kernel from where the computation rounds (u = 2^-8 for bf16, 2^-24 for fp32,
the unit roundoff). Compatibility: bf16 results must also be bit-identical to transformers'
formulation (each product and sum rounds where the separate torch ops round), written out here
too, not taken from the module; fp32 rope is bit-identical as well.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from tandem.engine import fused

pytestmark = pytest.mark.skipif(not fused.fused_applies(torch.zeros(1)), reason="no native kernels here")

DTYPES = [torch.bfloat16, torch.float32]
ROWS = [1, 7, 300]  # decode-sized (one thread) and prefill-sized (split across threads)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def _rope_tables(rows: int, dim: int, dtype: torch.dtype):
    angles = torch.rand(rows, dim // 2) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float) -> None:
    """|got - want| <= bound elementwise (want and bound in float64)."""
    error = (got.double() - want).abs()
    excess = error - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"error {error.flatten()[worst].item():.3g} above its bound at flat index "
                               f"{worst} (want {want.flatten()[worst].item():.6g})")


# float64 references -------------------------------------------------------------------------

def _rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rope_f64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rope (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), and the sum of the two
    terms' magnitudes that scales its rounding error."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin, (x * cos).abs() + (rotated * sin).abs()


def _silu_mul_f64(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.double()
    return gate / (1 + torch.exp(-gate)) * up.double()


# transformers' formulations (the bit-exact contract) -----------------------------------------

def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward: normalise in fp32, round to x's dtype, then scale."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _hf_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb with its rotate_half."""
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin


# tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_add_rms_norm_adds_in_place_and_normalises(dtype, rows) -> None:
    """The stream becomes the correctly rounded x + delta; the output is RMSNorm of it within two
    roundings to the dtype (the normalised value, then its product with the weight; fp32 also
    has the norm's sum and rsqrt, within 4 units), and bf16 is transformers' result bit for bit."""
    torch.manual_seed(rows)
    x, delta = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    weight = (torch.rand(576) + 0.5).to(dtype)
    stream = x.clone()
    got = fused.add_rms_norm(stream, weight, 1e-5, residual=delta)
    assert torch.equal(stream, (x.double() + delta.double()).to(dtype))
    u = UNIT_ROUNDOFF[dtype]
    roundings = 2 if dtype == torch.bfloat16 else 6
    for out, source in ((got, stream), (fused.add_rms_norm(x.clone(), weight, 1e-5), x)):
        want = _rms_norm_f64(source, weight, 1e-5)
        _assert_within(out, want, roundings * u * want.abs() * (1 + 1e-3))
        if dtype == torch.bfloat16:
            assert torch.equal(out, _hf_rms_norm(source, weight, 1e-5))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(dtype, rows) -> None:
    """Query and key heads are rotated (three roundings: two products, one sum, so the error is
    at most 2u (|x cos| + |rot(x) sin|)), bit for bit as transformers rotates them; the value
    heads are untouched."""
    torch.manual_seed(rows)
    heads, dim = 12, 64  # 9 query + 3 key heads, then 3 value heads
    qkv = torch.randn(rows, (heads + 3) * dim).to(dtype)
    cos, sin = _rope_tables(rows, dim, dtype)
    got = qkv.clone()
    fused.rope_(got, heads, cos, sin)
    rotated = got[:, : heads * dim].view(rows, heads, dim)
    qk = qkv[:, : heads * dim].view(rows, heads, dim)
    want, scale = _rope_f64(qk, cos, sin)
    _assert_within(rotated, want, 2 * UNIT_ROUNDOFF[dtype] * scale * (1 + 1e-3))
    assert torch.equal(rotated, _hf_rope(qk, cos, sin))
    assert torch.equal(got[:, heads * dim:], qkv[:, heads * dim:])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_silu_mul(dtype, rows) -> None:
    """silu(gate) * up within its roundings: bf16 rounds silu and the product (2u relative, plus
    the fp32 silu's few ulps); fp32 has exp, add, divide and multiply (within 8 units: expf is
    not correctly rounded); bf16 matches torch's ``F.silu(gate) * up`` bit for bit."""
    torch.manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536) * 4).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    got = fused.silu_mul(gate_up)
    want = _silu_mul_f64(gate, up)
    units = 2 * UNIT_ROUNDOFF[dtype] + 8 * 2.0**-24 if dtype == torch.bfloat16 else 8 * 2.0**-24
    _assert_within(got, want, units * want.abs())
    if dtype == torch.bfloat16:
        assert torch.equal(got, F.silu(gate) * up)


def test_other_dtypes_and_strided_inputs_take_the_torch_path() -> None:
    """Inputs the kernels do not take still get the right answer (float64 formulas)."""
    x = torch.randn(5, 32, dtype=torch.float16)
    weight = (torch.rand(32) + 0.5).to(torch.float16)
    assert not fused.fused_applies(x, weight)
    want = _rms_norm_f64(x, weight, 1e-6)
    _assert_within(fused.add_rms_norm(x.clone(), weight, 1e-6), want, 2 * 2.0**-11 * want.abs() * (1 + 1e-3))
    strided = torch.randn(32, 5).t()  # last dimension not contiguous
    assert not fused.fused_applies(strided)
    gate, up = strided.split(16, dim=-1)
    want = _silu_mul_f64(gate, up)
    _assert_within(fused.silu_mul(strided), want, 8 * 2.0**-24 * want.abs())


def _first_argmax(row: list[float]) -> int:
    """torch's rule, written out: the first NaN if there is one, else the first of the maxima."""
    for i, value in enumerate(row):
        if math.isnan(value):
            return i
    best = max(row)
    return row.index(best)


@pytest.mark.parametrize("cols", [1, 7, 8, 255, 256, 257, 49152])
def test_argmax_rows_matches_the_first_maximum(cols) -> None:
    gen = torch.Generator().manual_seed(cols)
    logits = torch.randn(6, cols, generator=gen)
    logits[1] = 0.0  # all tied: the first index
    if cols > 3:
        logits[2, cols // 2] = logits[2, cols - 1] = 1e3  # a tie across blocks: the first wins
        logits[3, 1] = logits[3, 3] = float("nan")  # the first NaN, however large the rest
        logits[3, 2] = 1e30
        logits[4, cols - 2] = float("inf")
    logits[5] = float("-inf")
    got = fused.argmax_rows(logits)
    assert got.dtype == torch.int64
    assert got.tolist() == [_first_argmax(row) for row in logits.tolist()]


def test_argmax_rows_keeps_torch_for_other_inputs() -> None:
    logits = torch.randn(3, 40)
    want = [_first_argmax(row) for row in logits.t().tolist()]
    assert fused.argmax_rows(logits.t()).tolist() == want  # not contiguous
    assert fused.argmax_rows(logits.double()).tolist() == [_first_argmax(r) for r in logits.tolist()]
