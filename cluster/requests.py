"""The router's record of one request (where it is, what the client has not read yet, its
lifetime) and the book of all of them.

Pure bookkeeping (no Ray): token deltas are accepted in order, buffered until the client's next
read (one coalesced chunk per read), and timestamped so TTFT/TPOT come out at the end. The book
cannot grow without bound: aborted records leave it at once, finished ones nobody reads after a
TTL, both into a bounded tail that can still be read.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tandem.cluster.mailbox import Mailbox
from tandem.engine.outputs import Completion, TokenDelta, TopLogprob
from tandem.engine.params import SamplingParams
from tandem.transfer.protocol import StreamChunk


@dataclass(eq=False)
class Migration:
    """A migration in flight (cluster/migration.py runs it)."""

    source: str
    dest: str
    start: float
    num_blocks: int  # blocks it holds at the start
    kind: str = "copy"  # "copy" (its KV), "recompute" (the destination prefills it again) or
    # "redispatch" (it had not started)
    phase: str = "precopy"  # precopy -> final (paused on the source) or resolving (reply lost)
    index: int = -1  # the first token index the destination produces (known at the final stage)
    stages: int = 0  # pre-copy stages done
    copied_blocks: int = 0  # blocks copied while the request kept decoding
    pause: float = 0.0  # when the source stopped it (the final stage began)

    @property
    def budget_blocks(self) -> int:
        """Blocks in flight between the two instances (what the budget counts)."""
        return self.num_blocks if self.kind == "copy" else 0


@dataclass(eq=False)
class RequestRecord:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.time)
    stage: str = "prefill"  # prefill -> transfer -> decode -> done
    prefill_instance: str | None = None
    decode_instance: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None
    early: dict[int, TokenDelta] = field(default_factory=dict)  # arrived ahead of a gap
    unread_from: int = 0  # index of the first token the client has not read
    unread_text_from: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: asyncio.TimerHandle | None = None  # the request's time limit, cancelled on finish
    mailbox: Mailbox | None = None  # the client's mailbox, when it streams through one
    # Decode ownership once a request has migrated: (instance, index of the first token it
    # produces), in order; a delta counts only from the instance that owned its index.
    owners: list[tuple[str, int]] = field(default_factory=list)
    migration: Migration | None = None
    migrations: list[dict] = field(default_factory=list)  # finished ones: from, to, times
    transfer_bytes: int = 0  # KV moved from the prefill instance to the decode instance
    recoveries: int = 0  # times it went on elsewhere after its instance was lost (recompute_lost)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def owned_by(self, instance_id: str, index: int) -> bool:
        """Whether ``instance_id`` owned the request when it produced token ``index`` (its decode
        instance, until a migration or recovery records owners by index)."""
        owner = self.decode_instance
        for candidate, first in self.owners:
            if first <= index:
                owner = candidate
        return owner is None or owner == instance_id

    def add_delta(self, delta: TokenDelta, now: float) -> None:
        """Apply deltas in token order: instances' messages may arrive out of order."""
        if self.done or delta.index < len(self.token_ids):
            return  # tokens racing an abort (the abort won), or a duplicate
        self.early[delta.index] = delta
        while len(self.token_ids) in self.early and not self.done:
            self._apply(self.early.pop(len(self.token_ids)), now)

    def _apply(self, delta: TokenDelta, now: float) -> None:
        self.token_ids.extend(delta.token_ids)
        self.token_times.extend([now] * len(delta.token_ids))
        self.text += delta.text
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.top_logprobs:
            self.top_logprobs.extend(delta.top_logprobs)
        if delta.finish_reason is not None:
            self.finish(delta.finish_reason, delta.error, now)
        self._notify()

    def finish(self, reason: str, error: str | None = None, now: float | None = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error, self.stage = reason, error, "done"
        if self.deadline is not None:
            self.deadline.cancel()
        self.events["finish"] = now or time.time()
        self._notify()

    def _notify(self) -> None:
        """Wake whoever waits for this request: its own poll, or its client's mailbox."""
        self.changed.set()
        if self.mailbox is not None:
            self.mailbox.post(self)

    def take_chunk(self) -> StreamChunk:
        """What the client has not read yet; marks it read."""
        start = self.unread_from
        tokens = self.token_ids[start:]
        text = self.text[self.unread_text_from:]
        self.unread_from, self.unread_text_from = len(self.token_ids), len(self.text)
        self.changed.clear()
        params = self.params
        return StreamChunk(self.request_id, tokens, text, self.finish_reason, self.error,
                           self.metrics() if self.done else None,
                           logprobs=self.logprobs[start:] if params.logprobs else None,
                           top_logprobs=self.top_logprobs[start:] if params.top_logprobs else None,
                           token_gaps=self.token_gaps() if self.done else None)

    def token_gaps(self) -> list[float]:
        """Seconds between each token and the next, as the router received them."""
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]

    def metrics(self) -> dict[str, float]:
        m = {k: v - self.arrival for k, v in self.events.items()}
        if self.token_times:
            m["ttft"] = self.token_times[0] - self.arrival
            if len(self.token_times) > 1:
                m["tpot"] = (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
        if "transfer_start" in self.events and "transfer_end" in self.events:
            m["transfer_time"] = self.events["transfer_end"] - self.events["transfer_start"]
        if self.transfer_bytes:
            m["transfer_bytes"] = float(self.transfer_bytes)
        m["num_prompt_tokens"] = float(len(self.prompt_ids))
        m["num_migrations"] = float(len(self.migrations))
        if self.recoveries:
            m["num_recoveries"] = float(self.recoveries)
        m["num_output_tokens"] = float(len(self.token_ids))
        return m

    def completion(self) -> Completion:
        return Completion(
            request_id=self.request_id, token_ids=list(self.token_ids), text=self.text,
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            top_logprobs=list(self.top_logprobs) if self.params.top_logprobs else None,
            prompt_token_ids=list(self.prompt_ids), metrics=self.metrics(), error=self.error,
        )


class RequestBook:
    """The router's records, bounded: live requests, plus a short tail of retired ones (aborted,
    or finished and unread past ``result_ttl_s``) that can still be read once. Ids it generates
    never collide with a caller's."""

    def __init__(self, result_ttl_s: float = 60.0, retired_max: int = 1024) -> None:
        self.result_ttl_s = result_ttl_s
        self.retired_max = retired_max
        self.live: dict[str, RequestRecord] = {}
        self._retired: OrderedDict[str, RequestRecord] = OrderedDict()
        self._ids = itertools.count()
        self.restarted = False  # a restarted router has lost every earlier request

    def __len__(self) -> int:
        return len(self.live)

    def add(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams) -> RequestRecord:
        """A new live record; raises ValueError if a caller's id is in use."""
        rid = self._new_id() if request_id is None else request_id
        if self._known(rid):
            raise ValueError(f"request id {rid!r} is already in use")
        rec = self.live[rid] = RequestRecord(rid, prompt_ids, params)
        return rec

    def _new_id(self) -> str:
        while True:
            rid = f"req-{next(self._ids)}"
            if not self._known(rid):
                return rid

    def _known(self, rid: str) -> bool:
        return rid in self.live or rid in self._retired

    def get(self, request_id: str) -> RequestRecord | None:
        """A live record (instances' messages are only for these)."""
        return self.live.get(request_id)

    def lookup(self, request_id: str) -> RequestRecord:
        """A live or retired record, for the client; KeyError if neither."""
        rec = self.live.get(request_id) or self._retired.get(request_id)
        if rec is None:
            lost = ", or lost when the router restarted" if self.restarted else ""
            raise KeyError(f"unknown request id {request_id!r} (never submitted, already read, "
                           f"or finished and unread too long{lost})")
        return rec

    def forget(self, request_id: str) -> None:
        """The client has read the finished request (or it never started)."""
        self.live.pop(request_id, None)
        self._retired.pop(request_id, None)

    def retire(self, rec: RequestRecord) -> None:
        """Move a finished record out of the live ones into the bounded tail."""
        if self.live.pop(rec.request_id, None) is not None:
            self._retired[rec.request_id] = rec
            while len(self._retired) > self.retired_max:
                self._retired.popitem(last=False)

    def expire(self, now: float) -> int:
        """Retire finished records nobody read within the TTL; how many."""
        stale = [rec for rec in self.live.values()
                 if rec.done and now - rec.events["finish"] > self.result_ttl_s]
        for rec in stale:
            self.retire(rec)
        return len(stale)
