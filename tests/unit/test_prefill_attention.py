"""Prefill attention over packed sequences (engine/attention.py) against a float64 formula."""
from __future__ import annotations

import math

import torch

from engine.attention import prefill_attention


def _reference(q, k, v, lens, scale):
    """Causal softmax attention of each sequence alone, query head h on KV head h // group."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out)


def test_runs_of_equal_lengths_and_single_sequences_attend_only_to_their_own_prefix() -> None:
    torch.manual_seed(0)
    lens = (3, 5, 5, 5, 2, 7, 7, 1)  # runs of one length batched together, others alone
    heads, kv_heads, dim = 6, 2, 16
    fused = torch.randn(sum(lens), (heads + 2 * kv_heads) * dim)  # strided views, as the model has
    q = fused[:, :heads * dim].view(-1, heads, dim)
    k = fused[:, heads * dim:(heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
    got = prefill_attention(q, k, v, lens, dim**-0.5)
    assert got.shape == (sum(lens), heads, dim)
    torch.testing.assert_close(got.double(), _reference(q, k, v, lens, dim**-0.5), rtol=1e-5, atol=1e-5)
