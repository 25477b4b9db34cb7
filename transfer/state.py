"""Convert an engine ``Sequence`` to and from the ``RequestState`` that travels between instances."""
from __future__ import annotations

import torch

from engine.sequence import Sequence
from engine.tokenizer import DetokenizerState
from transfer.messages import RequestState


def state_of(seq: Sequence) -> RequestState:
    rng = None if seq.generator is None else bytes(seq.generator.get_state().numpy())
    return RequestState(
        request_id=seq.request_id, token_ids=list(seq.token_ids),
        num_prompt_tokens=seq.num_prompt_tokens, params=seq.params, rng_state=rng,
        prefix_offset=seq.detok.prefix_offset, read_offset=seq.detok.read_offset,
        text=seq.text, logprobs=list(seq.logprobs), num_preemptions=seq.num_preemptions,
    )


def sequence_from(state: RequestState) -> Sequence:
    generator = None
    if state.rng_state is not None:
        generator = torch.Generator(device="cpu")
        generator.set_state(torch.frombuffer(bytearray(state.rng_state), dtype=torch.uint8))
    return Sequence(
        request_id=state.request_id, token_ids=list(state.token_ids),
        num_prompt_tokens=state.num_prompt_tokens, params=state.params, generator=generator,
        detok=DetokenizerState(state.prefix_offset, state.read_offset), text=state.text,
        logprobs=list(state.logprobs), num_preemptions=state.num_preemptions,
    )
