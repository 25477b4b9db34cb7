"""A step's inputs as plain data, and the tensors a model shard builds from them.

The scheduler's ``StepPlan`` holds live ``Sequence``s; ``StepInputs`` is what a model needs of it
(token ids, lengths, block tables), so a controller can send it to the workers of a parallel
instance (msgspec-encoded) and every worker builds the same slot indices from it.
"""
from __future__ import annotations

from typing import Literal

import msgspec
import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.scheduler import StepPlan


class StepInputs(msgspec.Struct, frozen=True, array_like=True):
    """prefill: every sequence's whole ``token_ids`` packed, ``seq_lens`` their lengths; decode:
    each sequence's newest token, ``seq_lens`` its context length. ``block_tables`` per sequence.
    A chunked-prefill step is a prefill with ``query_lens``: each sequence's new tokens (its last
    ``query_lens[i]`` of ``seq_lens[i]``), decodes (one token) first.
    ``greedy``: every sequence samples greedily and wants no logprobs, so the worker holding the
    logits returns the chosen token ids instead (a few bytes, not a vocabulary per sequence)."""

    kind: Literal["prefill", "decode"]
    token_ids: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    greedy: bool = False
    query_lens: list[int] | None = None

    @property
    def new_tokens(self) -> list[int]:
        """Tokens each sequence feeds the model this step."""
        if self.kind == "decode":
            return [1] * len(self.seq_lens)
        return self.query_lens if self.query_lens is not None else self.seq_lens


def step_inputs(plan: StepPlan, tables: dict[str, list[int]], greedy: bool = False) -> StepInputs:
    seqs = plan.seqs
    if plan.kind == "mixed":
        ids = [t for s, (start, n) in zip(seqs, plan.chunks) for t in s.token_ids[start:start + n]]
        return StepInputs("prefill", ids, [start + n for start, n in plan.chunks],
                          [tables[s.request_id] for s in seqs], greedy, [n for _, n in plan.chunks])
    if plan.kind == "prefill":
        ids = [t for s in seqs for t in s.token_ids]
    else:
        ids = [s.last_token for s in seqs]
    return StepInputs(plan.kind, ids, [s.num_tokens for s in seqs], [tables[s.request_id] for s in seqs], greedy)


def split_inputs(inputs: StepInputs, parts: int, min_tokens: int = 1) -> list[StepInputs]:
    """``inputs`` cut into at most ``parts`` micro-batches of whole sequences, in order, as even in
    tokens as contiguous cuts make them, and of about ``min_tokens`` new tokens or more each: a
    pipeline-parallel instance runs them through its stages one behind the other, so every stage
    has work. Each sequence's logits come out in order."""
    count = len(inputs.seq_lens)
    new_tokens = len(inputs.token_ids)
    parts = max(1, min(parts, count, new_tokens // max(1, min_tokens)))
    if parts == 1:
        return [inputs]
    tokens = inputs.new_tokens
    total, cuts, running = sum(tokens), [], 0
    for index, n in enumerate(tokens[:-1]):
        running += n
        if running * parts >= total * (len(cuts) + 1) and count - index - 1 >= parts - len(cuts) - 1:
            cuts.append(index + 1)
        if len(cuts) == parts - 1:
            break
    bounds = [0, *cuts, count]
    offsets = [0]
    for n in tokens:
        offsets.append(offsets[-1] + n)
    query = inputs.query_lens
    return [StepInputs(inputs.kind, inputs.token_ids[offsets[a]:offsets[b]], inputs.seq_lens[a:b],
                       inputs.block_tables[a:b], inputs.greedy, None if query is None else query[a:b])
            for a, b in zip(bounds, bounds[1:])]


def _slots(table: list[int], block_size: int, end: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:end]


def model_inputs(inputs: StepInputs, block_size: int, device: torch.device) -> tuple:
    """(input ids, positions, attention metadata, logits rows): the model's arguments but the cache."""
    if inputs.kind == "prefill":
        return _prefill(inputs, block_size, device)
    return _decode(inputs, block_size, device)


def _prefill(inputs: StepInputs, block_size: int, device: torch.device) -> tuple:
    if inputs.query_lens is not None:
        return _chunked(inputs, block_size, device)
    lens = tuple(inputs.seq_lens)
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([_slots(table, block_size, n) for table, n in zip(inputs.block_tables, lens)])
    last = torch.tensor(lens).cumsum(0) - 1
    meta = AttentionMetadata(True, slots.to(device), lens)
    return torch.tensor(inputs.token_ids, device=device), positions.to(device), meta, last.to(device)


def _chunked(inputs: StepInputs, block_size: int, device: torch.device) -> tuple:
    """A mixed step: the leading one-token sequences as decodes, then prompt chunks, each at the
    positions after its cached prefix; logits for every sequence's last new token."""
    query, lens = inputs.query_lens, inputs.seq_lens
    decodes = next((i for i, n in enumerate(query) if n != 1), len(query))
    prefixes = [total - n for total, n in zip(lens, query)]
    contexts = [_slots(table, block_size, n) for table, n in zip(inputs.block_tables, lens)]
    positions = torch.cat([torch.arange(p, total) for p, total in zip(prefixes, lens)])
    slots = torch.cat([c[p:] for c, p in zip(contexts, prefixes)])
    context = mask = context_lens = None
    if decodes:
        context, mask, context_lens = _decode_context(inputs.block_tables[:decodes], lens[:decodes], block_size)
        context, mask, context_lens = context.to(device), mask.to(device), context_lens.to(device)
    chunk_prefixes = tuple(prefixes[decodes:])
    chunk_context = torch.cat(contexts[decodes:]).to(device) if any(chunk_prefixes) else None
    meta = AttentionMetadata(True, slots.to(device), tuple(query[decodes:]), context, mask, context_lens,
                             num_decodes=decodes, prefix_lens=chunk_prefixes, chunk_context=chunk_context)
    last = torch.tensor(query).cumsum(0) - 1
    return torch.tensor(inputs.token_ids, device=device), positions.to(device), meta, last.to(device)


def _decode_context(block_tables: list[list[int]], seq_lens: list[int], block_size: int) -> tuple:
    """Each sequence's context slots ``[B, Lmax]``, the valid-slot mask ``[B, 1, 1, Lmax]`` and
    the context lengths ``[B]``."""
    batch = len(seq_lens)
    lens = torch.tensor(seq_lens)
    width = max(len(table) for table in block_tables)
    tables = torch.zeros(batch, width, dtype=torch.long)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = torch.tensor(table)
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).reshape(batch, -1)
    max_len = int(lens.max())
    context = slots[:, :max_len].contiguous()
    mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]
    return context, mask, lens


def _decode(inputs: StepInputs, block_size: int, device: torch.device) -> tuple:
    batch = len(inputs.seq_lens)
    context, mask, lens = _decode_context(inputs.block_tables, inputs.seq_lens, block_size)
    positions = lens - 1
    new_slots = context.gather(1, positions[:, None]).squeeze(1)
    meta = AttentionMetadata(False, new_slots.to(device), (), context.to(device), mask.to(device),
                             lens.to(device))
    ids = torch.tensor(inputs.token_ids, device=device)
    return ids, positions.to(device), meta, torch.arange(batch, device=device)
