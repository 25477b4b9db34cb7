"""Engine knobs the simulator must share with the real instances to predict them."""
from __future__ import annotations

from typing import Annotated

import msgspec

Pos = Annotated[int, msgspec.Meta(ge=1)]


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Batching and memory policy of prefill, decode and colocated instances.

    Prefill forms FCFS batches of whole prompts under ``prefill_token_budget`` tokens (a prompt longer
    than the budget runs alone). Decode batches continuously up to ``decode_max_batch`` sequences;
    its admission waits while fewer than the request's blocks plus a ``watermark`` share of all
    blocks are free, so a fresh admission cannot immediately force a preemption.

    ``chunked_prefill`` (colocated instances): every step is one budget of ``prefill_token_budget``
    tokens; the running decodes go first and prompt chunks fill the rest (Sarathi-Serve's
    stall-free batching, engine/scheduler.py), so a prompt may take several steps; one prompt's
    chunk is at most ``long_prefill_tokens`` (None: the budget).
    """

    prefill_token_budget: Pos = 4096
    prefill_max_batch: Pos = 64
    decode_max_batch: Pos = 256
    block_size: Pos = 16
    memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    watermark: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.01
    chunked_prefill: bool = False
    long_prefill_tokens: Pos | None = None
