"""One request's mutable state inside an engine: tokens, sampling RNG, detokenizer, timings."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.handover import RequestState
from tandem.engine.outputs import TopLogprob
from tandem.engine.params import SamplingParams
from tandem.engine.tokenizer import DetokenizerState


class Status(enum.Enum):
    WAITING = "waiting"  # needs a prefill (new, or preempted and to be recomputed)
    PREFILLING = "prefilling"  # chunked prefill under way: KV for its first ``num_cached`` tokens
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
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"
    num_preemptions: int = 0
    num_cached: int = 0  # while PREFILLING: tokens whose KV earlier chunks wrote

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


def state_of(seq: Sequence) -> RequestState:
    """What travels with a request that leaves this engine (everything but its KV)."""
    rng = None if seq.generator is None else bytes(seq.generator.get_state().numpy())
    return RequestState(
        request_id=seq.request_id, token_ids=list(seq.token_ids),
        num_prompt_tokens=seq.num_prompt_tokens, params=seq.params, rng_state=rng,
        prefix_offset=seq.detok.prefix_offset, read_offset=seq.detok.read_offset,
        text=seq.text, logprobs=list(seq.logprobs), num_preemptions=seq.num_preemptions,
        top_logprobs=list(seq.top_logprobs),
    )


def sequence_from(state: RequestState) -> Sequence:
    """The engine-side request for a state that arrived from another engine."""
    generator = None
    if state.rng_state is not None:
        generator = torch.Generator(device="cpu")
        generator.set_state(torch.frombuffer(bytearray(state.rng_state), dtype=torch.uint8))
    return Sequence(
        request_id=state.request_id, token_ids=list(state.token_ids),
        num_prompt_tokens=state.num_prompt_tokens, params=state.params, generator=generator,
        detok=DetokenizerState(state.prefix_offset, state.read_offset), text=state.text,
        logprobs=list(state.logprobs), num_preemptions=state.num_preemptions,
        top_logprobs=list(state.top_logprobs),
    )
