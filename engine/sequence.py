"""One request's mutable state inside an engine: tokens, sampling RNG, detokenizer, timings."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.params import SamplingParams
from tandem.engine.tokenizer import DetokenizerState


class Status(enum.Enum):
    WAITING = "waiting"  # needs a prefill (new, or preempted and to be recomputed)
    RUNNING = "running"  # has KV for all but its newest token; decodes each step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids are prompt + output; the KV of every token but the newest is in the cache."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    detok: DetokenizerState
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


def make_generator(params: SamplingParams, fallback_seed: int) -> torch.Generator | None:
    """A private RNG per sampled request: its draws never depend on the batch it lands in."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else fallback_seed)
    return gen
