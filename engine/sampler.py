"""Token sampling: greedy, temperature, top-k, top-p, each request with its own RNG.

Each sampled row draws from its request's generator only, so a seeded request produces the same
tokens alone or inside any batch. Filtering sets excluded logits to -inf before the softmax, so
``multinomial`` can never pick an excluded token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from tandem.engine.fused import argmax_rows
from tandem.engine.outputs import TopLogprob
from tandem.engine.sequence import Sequence


class Sampled(NamedTuple):
    """A step's choices: a token per row; if any request asked, the model's log-probability of
    each chosen token, and per row the ``top_logprobs`` most likely tokens (None where not asked)."""

    tokens: list[int]
    logprobs: list[float] | None = None
    top: list[list[TopLogprob] | None] | None = None


class WorkerSampled(NamedTuple):
    """Tokens a parallel instance's output worker already chose (greedy, no logprobs asked)."""

    tokens: list[int]


def select_rows(logits: torch.Tensor | WorkerSampled, rows: list[int], total: int):
    """The rows of a step's logits (or worker-chosen tokens) that sample: all of them unless a
    chunked prefill left some prompts mid-way."""
    if len(rows) == total:
        return logits
    if isinstance(logits, WorkerSampled):
        return WorkerSampled([logits.tokens[i] for i in rows])
    return logits[torch.tensor(rows, device=logits.device)]


def sample(logits: torch.Tensor | WorkerSampled, seqs: list[Sequence]) -> Sampled:
    """logits: fp32 ``[B, vocab]`` (or the tokens a worker chose)."""
    if isinstance(logits, WorkerSampled):
        return Sampled(logits.tokens)
    if logits.device.type != "cpu" and all(s.params.greedy and not s.params.logprobs for s in seqs):
        return Sampled(logits.argmax(dim=-1).tolist())  # on the GPU: only the ids cross to the host
    logits = logits.cpu()
    tokens = argmax_rows(logits)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        tokens[random_rows] = _sample_rows(logits[random_rows], [seqs[i] for i in random_rows])
    chosen = tokens.tolist()
    if not any(s.params.logprobs for s in seqs):
        return Sampled(chosen)
    all_logprobs = torch.log_softmax(logits, dim=-1)
    logprobs = all_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    most = max(s.params.top_logprobs for s in seqs)
    if not most:
        return Sampled(chosen, logprobs)
    values, ids = all_logprobs.topk(most, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    top = [[TopLogprob(t, v) for t, v in zip(ids[i][:n], values[i][:n])] if (n := s.params.top_logprobs) else None
           for i, s in enumerate(seqs)]
    return Sampled(chosen, logprobs, top)


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temperature = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    logits = logits / temperature[:, None]
    needs_filter = any(s.params.top_k > 0 or s.params.top_p < 1 for s in seqs)
    if needs_filter:
        logits, order = logits.sort(dim=-1, descending=True)
        logits = _filter_sorted(logits, seqs)
    probs = torch.softmax(logits, dim=-1)
    picks = torch.stack([
        torch.multinomial(probs[i], 1, generator=seq.generator)[0] for i, seq in enumerate(seqs)
    ])
    if needs_filter:
        picks = order.gather(1, picks[:, None]).squeeze(1)
    return picks


def _filter_sorted(sorted_logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask descending-sorted logits outside each row's top-k and top-p nucleus."""
    vocab = sorted_logits.shape[-1]
    top_k = torch.tensor([s.params.top_k or vocab for s in seqs])
    rank = torch.arange(vocab)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    # top_p == 1 must keep the whole tail even where the cumulative sum rounds up to 1.
    top_p = torch.tensor([s.params.top_p if s.params.top_p < 1 else 2.0 for s in seqs])
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the mass strictly before it already reaches top_p (the top one always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    return sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
