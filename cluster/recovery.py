"""Requests an instance held when it left service, sent on elsewhere (``router.recompute_lost``).
One with no token yet is dispatched anew; one with output is rebuilt from what the router knows
of it (prompt, output so far, emitted text), and the decode instance that takes it recomputes its
KV with a prefill and decodes on. No Ray import: instance handles are duck-typed."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from tandem.cluster.requests import RequestRecord
from tandem.engine.handover import RequestState
from tandem.engine.tokenizer import Tokenizer, replay_detokenizer
from tandem.transfer.protocol import remote_cause


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


class LostRequests:
    """The router's side: ``prefill``/``decode`` are its in-service pools (live views),
    ``dispatch_new(rec)`` sends a request to an instance as a new one, ``free_everywhere(rec)``
    frees a request that ended."""

    def __init__(self, dispatch, prefill: dict, decode: dict, tokenizer: Tokenizer | None,
                 dispatch_new: Callable[[RequestRecord], Awaitable[None]],
                 free_everywhere: Callable[[RequestRecord], None], call_timeout_s: float) -> None:
        self.dispatch, self.prefill, self.decode, self.tokenizer = dispatch, prefill, decode, tokenizer
        self.dispatch_new, self.free_everywhere = dispatch_new, free_everywhere
        self.call_timeout_s = call_timeout_s

    def go_on_elsewhere(self, rec: RequestRecord, lost: str, reason: str) -> str | None:
        """Send a request the lost instance held elsewhere (None), or say why it cannot go on."""
        self.dispatch.forget(rec)
        if not rec.token_ids:
            rec.prefill_instance = rec.decode_instance = None
            rec.stage, rec.owners = "prefill", []  # whichever instance takes it owns it
            rec.recoveries += 1
            asyncio.ensure_future(self._redispatch(rec, reason))
            return None
        try:
            state = lost_state(rec, self.tokenizer)
            target = self.dispatch.pick_decode(rec.request_id, len(state.token_ids) + 1)
        except (Unrecoverable, RuntimeError) as exc:
            return str(exc)
        rec.recoveries += 1
        if rec.stage == "transfer" and rec.prefill_instance in self.prefill:
            self.prefill[rec.prefill_instance].ack.remote([rec.request_id])  # its KV is not needed now
        rec.owners = (rec.owners or [(lost, 0)]) + [(target, len(rec.token_ids))]
        rec.decode_instance, rec.stage = target, "decode"
        asyncio.ensure_future(self._recompute(rec, target, state, reason))
        return None

    async def _redispatch(self, rec: RequestRecord, reason: str) -> None:
        try:
            await self.dispatch_new(rec)
        except Exception as exc:
            self._fail(rec, f"{reason}; sending it elsewhere failed: {remote_cause(exc)}")

    async def _recompute(self, rec: RequestRecord, target: str, state: RequestState, reason: str) -> None:
        try:
            await asyncio.wait_for(self.decode[target].recompute.remote(state), self.call_timeout_s)
        except Exception as exc:
            self._fail(rec, f"{reason}; recomputing it on {target} failed: {remote_cause(exc)}")

    def _fail(self, rec: RequestRecord, why: str) -> None:
        rec.finish("error", why)
        self.free_everywhere(rec)
