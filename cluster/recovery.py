"""Requests an instance held when it left service, rebuilt from what the router knows of them
(``router.recompute_lost``): prompt, output so far and emitted text; the instance that takes one
recomputes its KV with a prefill and decodes on. Pure (no Ray)."""
from __future__ import annotations

from tandem.cluster.requests import RequestRecord
from tandem.engine.handover import RequestState
from tandem.engine.tokenizer import Tokenizer, replay_detokenizer


class Unrecoverable(ValueError):
    """Why a lost request cannot go on elsewhere unchanged."""


def lost_state(rec: RequestRecord, tokenizer: Tokenizer | None) -> RequestState:
    """The state a request would have carried had it migrated, minus what only its instance had:
    the sampling RNG. Greedy requests need none, and an unseeded one goes on with a fresh stream
    (an equally valid sample); a seeded one raises Unrecoverable, since it could not give the
    tokens its seed promises."""
    params = rec.params
    if not params.greedy and params.seed is not None:
        raise Unrecoverable("its seeded sampling stream was lost with the instance, so it is not "
                            "recomputed elsewhere")
    ids = [*rec.prompt_ids, *rec.token_ids]
    detok = replay_detokenizer(tokenizer, ids, len(rec.prompt_ids))
    return RequestState(request_id=rec.request_id, token_ids=ids, num_prompt_tokens=len(rec.prompt_ids),
                        params=params, rng_state=None, prefix_offset=detok.prefix_offset,
                        read_offset=detok.read_offset, text=rec.text, logprobs=list(rec.logprobs),
                        top_logprobs=list(rec.top_logprobs))
