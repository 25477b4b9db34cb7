"""Router: an async Ray actor that validates requests, dispatches them, and fans out token streams.

Lifecycle (disaggregated): submit -> prefill instance (least queued tokens) -> on_prefilled: first
token streamed, decode instance chosen (most free blocks) and told to admit the KV -> each decode
step report carries every running request's new tokens -> the prefill side is acked once the
decode side has pulled the KV. In colocated mode requests go straight to an engine instance.

Messages for a request the router no longer tracks (aborted, finished, failed) are answered by
freeing that request on the sender, so a race with an abort never leaks blocks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from pathlib import Path

import ray

from tandem.cluster.dispatch import Dispatcher
from tandem.cluster.health import lost_verdict
from tandem.cluster.launcher_config import LaunchConfig, decode_groups, instance_names
from tandem.cluster.mailbox import Mailboxes
from tandem.cluster.migration import MigrationDesk
from tandem.cluster.rebalancer import Rebalancer
from tandem.cluster.recovery import LostRequests
from tandem.cluster.requests import RequestBook, RequestRecord
from tandem.cluster.roster import CALL_TIMEOUT_S, Roster, named_instances
from tandem.engine.config import load_config
from tandem.engine.engine import context_limit
from tandem.engine.outputs import Completion
from tandem.engine.params import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.engine.validation import prompt_token_ids, validate_request
from tandem.transfer.protocol import (Overloaded, PrefillResult, StepReport, StreamChunk, remote_cause,
                                      timeout_error)

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 4096  # shorter prompts tokenize in well under a millisecond
HEALTH_INTERVAL_S = 1.0  # how often every instance is asked how it is
MAILBOX_GRACE_S = 60.0  # a mailbox outlives its client's last poll by the result TTL plus this


@ray.remote(num_cpus=0, max_restarts=-1)
class Router:
    """Restarted by Ray when its process dies: every request in flight then is lost (its clients'
    calls fail, the instances are told to drop it), and the restarted router finds its instances
    by name and serves new requests."""

    def __init__(self, config: LaunchConfig) -> None:
        model_config = load_config(Path(config.model_dir))
        self.config = config
        self.tokenizer = Tokenizer.from_model_dir(Path(config.model_dir))
        self.vocab_size = model_config.vocab_size
        self.max_model_len = min(context_limit(model_config, g.engine.max_model_len) for g in decode_groups(config))
        self.dispatch = Dispatcher(config.prefill_policy, config.decode_policy)
        self.roster = Roster(config, self.dispatch, on_out=self._fail_requests_on)
        self.prefill, self.decode = self.roster.prefill, self.roster.decode  # in service, by id
        self.migrations = MigrationDesk(self.decode, self.dispatch, self._free_everywhere, CALL_TIMEOUT_S,
                                        config.migration)
        self.rebalancer = Rebalancer(self.migrations, lambda: self.book.live.values())
        self.lost = LostRequests(self.dispatch, self.prefill, self.decode, self.tokenizer, self._dispatch_new,
                                 self._free_everywhere, CALL_TIMEOUT_S)
        self._rebalancing: asyncio.Future | None = None
        self.capacity_tokens = 0
        self.book = RequestBook(config.result_ttl_s)
        self.mailboxes = Mailboxes(idle_s=config.result_ttl_s + MAILBOX_GRACE_S)
        self.registered = asyncio.Event()
        self.polls = 0  # poll and poll_mailbox calls answered: how well streams coalesce
        self._watcher: asyncio.Future | None = None
        self.book.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.book.restarted:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def register(self, prefill: dict, decode: dict) -> None:
        """Attach the instance pools; learns each decode instance's cache size."""
        handles = [("prefill", iid, h) for iid, h in prefill.items()]
        handles += [("decode", iid, h) for iid, h in decode.items()]
        stats = await asyncio.gather(*(asyncio.wait_for(h.stats.remote(), CALL_TIMEOUT_S)
                                       for _, _, h in handles))
        for (role, iid, handle), s in zip(handles, stats):
            self.roster.add(role, iid, handle, s)
        if stats:
            self.capacity_tokens = min(s["num_blocks"] for s in stats) * self.config.decode.engine.block_size
            self.migrations.block_bytes = max(s.get("block_bytes", 0) for s in stats)
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_health())
        if self._rebalancing is None and self.config.migration.enabled:
            self._rebalancing = asyncio.ensure_future(self.rebalancer.run())
        self.registered.set()

    async def _recover(self) -> None:
        """After a restart: find the instances by name, have each drop every request (they were
        the previous router's, and nobody can read them now), then serve again. One that does not
        answer is benched: it rejoins once it does."""
        found = {role: named_instances(names) for role, names in instance_names(self.config).items()}
        handles = [(role, iid, h) for role, pool in found.items() for iid, h in pool.items()]
        results = await asyncio.gather(
            *(asyncio.wait_for(h.abort_all.remote(), CALL_TIMEOUT_S) for _, _, h in handles),
            return_exceptions=True)
        for (role, iid, handle), result in zip(handles, results):
            if isinstance(result, BaseException):
                log.error("%s instance %s did not answer the restarted router: %r", role, iid, result)
                found[role].pop(iid)
                self.roster.bench(role, iid, handle, "did not answer the restarted router")
        log.warning("router restarted: %d requests in flight were lost; serving with %s",
                    sum(r for r in results if isinstance(r, int)), [*found["prefill"], *found["decode"]])
        await self.register(found["prefill"], found["decode"])

    async def _watch_health(self) -> None:
        """Every second: retire stale records and mailboxes, and check on every instance."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            self.book.expire(time.time())
            self.mailboxes.expire(time.monotonic())
            await self.roster.check()

    async def on_instance_failed(self, instance_id: str, failure: str) -> None:
        """An instance's step failed and its loop stopped: out of service now, not at the next
        health round."""
        self.roster.step_failed(instance_id, failure)

    def _fail_requests_on(self, role: str, iid: str, what_happened: str) -> None:
        """An instance left service: its requests fail with the cause, or with
        ``router.recompute_lost`` go on elsewhere, recomputed."""
        reason = f"{role} instance {iid} {what_happened}"
        for rec in list(self.book.live.values()):
            on_it = rec.prefill_instance == iid if role == "prefill" else rec.decode_instance == iid
            # A lost prefill instance loses the requests it had not finished prefilling; one in
            # transfer lives or dies by the decode side's fetch (the exported KV may outlive it).
            if on_it and not rec.done and (role == "decode" or rec.stage == "prefill"):
                if role == "decode" and self.migrations.resume(rec, reason):
                    continue  # it was migrating to the lost instance: it goes on at its source
                why = self.lost.go_on_elsewhere(rec, iid, reason) if self.config.recompute_lost else ""
                if why is None:
                    continue
                rec.finish("error", f"{reason}; {why}" if why else reason)
                self._free_everywhere(rec)

    # -- client side ----------------------------------------------------------------------------

    async def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     timeout_s: float | None = None, mailbox: str | None = None) -> str:
        """Validate and dispatch; raises ValueError for a bad request (nothing else is affected)
        and Overloaded at ``router.max_requests`` requests in flight. The request is timed out at
        ``router.request_timeout_s`` or at the caller's ``timeout_s``, whichever ends first. With
        ``mailbox``, its changes are posted there for ``poll_mailbox``."""
        await self._wait_registered()
        if len(self.book) >= self.config.max_requests:
            raise Overloaded(f"the cluster is overloaded: {len(self.book)} requests in flight, the "
                             f"limit router.max_requests={self.config.max_requests}; retry later")
        params = SamplingParams() if params is None else params
        ids = await self._tokenize(prompt)
        validate_request(ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                         capacity_tokens=self.capacity_tokens, has_tokenizer=self.tokenizer is not None)
        rec = self.book.add(request_id or None, ids, params)
        rid = rec.request_id
        if mailbox is not None:
            rec.mailbox = self.mailboxes.get(mailbox)
        self._set_deadline(rec, timeout_s)
        try:
            await self._dispatch_new(rec)
        except Exception as exc:
            self.book.forget(rid)
            rec.mailbox = None  # nothing to stream: the caller gets the error
            rec.finish("abort")  # cancels its deadline
            self.dispatch.forget(rec)
            raise remote_cause(exc) from None
        return rid

    async def _wait_registered(self) -> None:
        """Requests wait for the instance pools (a restarted router is finding them), bounded."""
        if not self.registered.is_set():
            try:
                await asyncio.wait_for(self.registered.wait(), CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise RuntimeError(f"the router has no instances yet ({CALL_TIMEOUT_S:g}s after it "
                                   "started): is the cluster still launching?") from None

    def _set_deadline(self, rec: RequestRecord, caller_timeout_s: float | None) -> None:
        seconds = self.config.request_timeout_s
        limit = f"router.request_timeout_s={seconds:g}s"
        if caller_timeout_s is not None and caller_timeout_s < seconds:
            limit, seconds = f"the caller's Client(timeout_s={caller_timeout_s:g})", caller_timeout_s
        rec.deadline = asyncio.get_running_loop().call_later(seconds, self._time_out, rec, limit)

    def _time_out(self, rec: RequestRecord, limit: str) -> None:
        """Abort a request everywhere for running past ``limit``; it finishes as a timeout error."""
        if not rec.done:
            rec.finish("error", timeout_error(rec.request_id, limit))
            self._free_everywhere(rec)

    async def _dispatch_new(self, rec: RequestRecord) -> None:
        """Send a new request to an instance; an instance found dead is dropped and another tried."""
        role = "decode" if self.config.mode == "colocated" else "prefill"
        pool = self.decode if role == "decode" else self.prefill
        while True:
            if role == "decode":
                iid = rec.decode_instance = self.dispatch.pick_decode(rec.request_id, len(rec.prompt_ids) + 1)
                rec.stage = "decode"
            else:
                iid = rec.prefill_instance = self.dispatch.pick_prefill(rec.request_id, len(rec.prompt_ids))
            try:
                await pool[iid].submit.remote(rec.request_id, rec.prompt_ids, rec.params)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                verdict = lost_verdict(exc, restartable=self.roster.restartable(iid))
                if verdict is None:
                    raise  # the instance refused this request: its error goes to the caller
                self.dispatch.forget(rec)
                rec.prefill_instance = rec.decode_instance = None  # not one of the lost one's requests
                self.roster.take_out(role, iid, verdict)  # then pick among the survivors

    async def _tokenize(self, prompt) -> list[int]:
        """Long text is tokenized off the event loop, so it never stalls other requests' streams."""
        if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(prompt_token_ids, prompt, self.tokenizer, self.max_model_len)
        return prompt_token_ids(prompt, self.tokenizer, self.max_model_len)

    async def poll(self, request_id: str, timeout_s: float = 30.0) -> StreamChunk:
        """New tokens since the last poll (waits up to timeout_s for some)."""
        self.polls += 1
        rec = self.book.lookup(request_id)
        if not rec.changed.is_set():
            try:
                await asyncio.wait_for(rec.changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        chunk = rec.take_chunk()
        if chunk.finished:
            self.book.forget(request_id)
        return chunk

    async def poll_mailbox(self, mailbox_id: str, timeout_s: float = 30.0) -> list[StreamChunk]:
        """A chunk for every request streaming through this mailbox that changed since the last
        call (waits up to timeout_s for one): one call per client, however many streams it has."""
        self.polls += 1
        chunks = []
        for rec in await self.mailboxes.get(mailbox_id).take(timeout_s):
            chunk = rec.take_chunk()
            if chunk.token_ids or chunk.finished:
                chunks.append(chunk)
            if chunk.finished:
                self.book.forget(rec.request_id)
        return chunks

    async def result(self, request_id: str, timeout_s: float = 600.0) -> Completion:
        """The finished request; one still running after the caller's ``timeout_s`` of waiting is
        timed out (aborted everywhere, finished as a timeout error)."""
        rec = self.book.lookup(request_id)
        deadline = time.monotonic() + timeout_s
        while not rec.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._time_out(rec, f"the caller's wait of {timeout_s:g}s for its result")
                break
            rec.changed.clear()
            try:
                await asyncio.wait_for(rec.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        self.book.forget(request_id)
        return rec.completion()

    async def generate(self, prompt, params: SamplingParams | None = None, timeout_s: float = 600.0) -> Completion:
        return await self.result(await self.submit(prompt, params, timeout_s=timeout_s), timeout_s)

    async def abort(self, request_id: str) -> bool:
        """Stop a request everywhere; its record leaves the live ones at once (still readable)."""
        rec = self.book.get(request_id)
        if rec is None or rec.done:
            return False
        rec.finish("abort")
        self._free_everywhere(rec)
        self.book.retire(rec)
        return True

    async def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation rendered with the model's chat template, as token ids (ValueError if the
        template refuses it or the model has none)."""
        from tandem.engine.prepare import render_chat

        text = render_chat(self.config.model_dir, messages)
        return await self._tokenize(text)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token id on its own as text (front ends label logprobs with them); "token_<id>"
        for a model without a tokenizer."""
        return self.tokenizer.token_texts(token_ids) if self.tokenizer else [f"token_{t}" for t in token_ids]

    async def limits(self) -> dict:
        """The longest request it takes, prompt and output together: the model's context and
        the smallest decode instance's KV (front ends size default output lengths by it)."""
        await self._wait_registered()
        return {"max_model_len": self.max_model_len, "capacity_tokens": self.capacity_tokens,
                "max_tokens": min(self.max_model_len, self.capacity_tokens or self.max_model_len)}

    async def describe(self, request_id: str) -> dict:
        """Where a request is (stage and instances): for status tools and tests."""
        rec = self.book.lookup(request_id)
        return {"stage": rec.stage, "prefill_instance": rec.prefill_instance,
                "decode_instance": rec.decode_instance, "num_tokens": len(rec.token_ids),
                "migrating": rec.migration is not None, "migrations": list(rec.migrations)}

    async def drain(self, instance_id: str, timeout_s: float = 120.0) -> dict:
        """Empty a decode instance: it takes no new request, and each of its requests moves to
        another instance as soon as it is decoding there. Returns how many moved and how many
        were still on it at ``timeout_s`` (requests that finished meanwhile are neither)."""
        if instance_id not in self.decode:
            raise ValueError(f"{instance_id!r} is not a decode instance in service "
                             f"(those are: {sorted(self.decode)})")
        self.dispatch.drain(instance_id)
        return await self.migrations.drain(lambda: self._on_instance(instance_id), timeout_s)

    def _on_instance(self, instance_id: str) -> list[RequestRecord]:
        return [rec for rec in self.book.live.values() if not rec.done and rec.decode_instance == instance_id]

    async def migrate(self, request_id: str, to: str | None = None, kind: str | None = None) -> str:
        """Move a request, live, to decode instance ``to`` (default: the one with the most free
        blocks); returns the destination. ``kind``: "copy" its KV or "recompute" it there (default:
        by ``migration.recompute_max_tokens``); a request not prefilled yet is re-dispatched.
        MigrationError (the request goes on where it was) if it is not on a decode instance,
        already migrating, or cannot leave its instance."""
        rec = self.book.get(request_id)
        if rec is None:
            raise KeyError(f"unknown request id {request_id!r} (not in flight)")
        return await self.migrations.start(rec, to, kind)

    def _free_everywhere(self, rec: RequestRecord) -> None:
        self.dispatch.forget(rec)
        self.migrations.abort_both(rec)
        if rec.prefill_instance in self.prefill:
            self.prefill[rec.prefill_instance].abort.remote(rec.request_id)
        if rec.decode_instance in self.decode:
            self.decode[rec.decode_instance].abort.remote(rec.request_id)

    # -- instance side --------------------------------------------------------------------------

    async def on_prefilled(self, instance_id: str, results: list[PrefillResult]) -> None:
        now = time.time()
        handovers: dict[str, list[tuple[RequestRecord, PrefillResult]]] = {}
        for r in results:
            rid = r.delta.request_id
            rec = self.book.get(rid)
            self.dispatch.prefill_done(instance_id, rid)
            if rec is None or rec.done or rec.prefill_instance != instance_id:  # ended, or sent
                if r.handle is not None and instance_id in self.prefill:  # elsewhere meanwhile
                    self.prefill[instance_id].ack.remote([rid])
                continue
            rec.events.update(prefill_start=r.prefill_start, prefill_end=r.prefill_end)
            rec.add_delta(r.delta, now)
            if r.state is not None and not rec.done:
                handovers.setdefault(self._hand_over(rec, r), []).append((rec, r))
        for target, batch in handovers.items():  # one admission call per decode instance
            asyncio.ensure_future(self._admit(target, batch))

    def _hand_over(self, rec: RequestRecord, r: PrefillResult) -> str:
        """Choose the decode instance that will pull this request's KV."""
        target = self.dispatch.pick_decode(rec.request_id, r.handle.num_tokens + 1)
        rec.decode_instance, rec.stage = target, "transfer"
        rec.events["transfer_start"] = time.time()
        rec.transfer_bytes += r.handle.num_blocks * r.handle.layout.block_bytes
        return target

    async def _admit(self, target: str, batch: list[tuple[RequestRecord, PrefillResult]]) -> None:
        """Hand a prefill step's requests to one decode instance; those it refuses (or all, if it
        is dead) fail alone."""
        try:
            refused = dict(await self.decode[target].admit.remote([(r.state, r.handle) for _, r in batch]))
        except Exception as exc:
            refused = {rec.request_id: str(remote_cause(exc)) for rec, _ in batch}
        for rec, _ in batch:
            if rec.request_id in refused:
                rec.finish("error", f"decode instance {target} refused the request: {refused[rec.request_id]}")
                self._free_everywhere(rec)

    async def on_decode_step(self, instance_id: str, report: StepReport) -> None:
        now = time.time()
        acks: dict[str, list[str]] = {}
        joined = report.started or now  # when the admitted requests joined the batch
        for rid in report.admitted:
            rec = self.book.get(rid)
            self.dispatch.admitted(instance_id, rid)
            if rec is not None and self.migrations.committed(rec, instance_id, joined):
                continue
            if rec is not None and rec.prefill_instance and "transfer_end" not in rec.events:
                rec.events["transfer_end"] = joined
                rec.stage = "decode" if not rec.done else rec.stage
                acks.setdefault(rec.prefill_instance, []).append(rid)
        for rid, error in report.failed:
            rec = self.book.get(rid)
            self.dispatch.admitted(instance_id, rid)
            if rec is not None and self.migrations.resume(rec, f"{instance_id} could not pull it: {error}"):
                continue
            if rec is not None:
                rec.finish("error", error, now)
                if rec.prefill_instance:
                    acks.setdefault(rec.prefill_instance, []).append(rid)
        for delta in report.deltas:
            rec = self.book.get(delta.request_id)
            if rec is None or rec.done:
                handle = self.roster.handle(instance_id)
                if not delta.finished and handle is not None:  # stale: aborted or failed meanwhile
                    handle.abort.remote(delta.request_id)
                continue
            if rec.owned_by(instance_id, delta.index):  # else a stale owner's: never counted twice
                rec.add_delta(delta, now)
                if rec.prefill_instance is None:  # colocated: prefilled here, its blocks now
                    self.dispatch.admitted(instance_id, rec.request_id)  # count in the free ones
            elif instance_id != rec.decode_instance and not delta.finished:
                stale = self.roster.handle(instance_id)  # it should not run there: stop it
                if stale is not None:
                    stale.abort.remote(delta.request_id)
        if instance_id in self.decode:
            self.dispatch.set_free_blocks(instance_id, report.free_blocks, running=report.num_requests)
            self.rebalancer.on_report(instance_id, report.preemptions)
        for prefill_id, rids in acks.items():
            if prefill_id in self.prefill:
                self.prefill[prefill_id].ack.remote(rids)

    async def stats(self) -> dict:
        names = [*self.prefill, *self.decode]
        handles = [*self.prefill.values(), *self.decode.values()]
        results = await asyncio.gather(*(asyncio.wait_for(h.stats.remote(), 10) for h in handles),
                                       return_exceptions=True)
        instances = {n: (r if isinstance(r, dict) else {"error": str(r)}) for n, r in zip(names, results)}
        for name, (_, _, why) in self.roster.benched.items():
            instances[name] = {"error": f"out of service: it {why}"}
        return {
            "requests": len(self.book),
            "instances": instances,
            "migrations": {**self.migrations.totals,
                           "in_flight": sum(rec.migration is not None for rec in self.book.live.values()),
                           "rebalancing": self.config.migration.enabled,
                           "moves_planned": self.rebalancer.moves_started},
            "router": {"mailboxes": len(self.mailboxes), "polls": self.polls,
                       "dispatch_estimates": self.dispatch.num_estimates(),
                       "max_requests": self.config.max_requests, "restarted": self.book.restarted,
                       **process_memory()},
        }


def process_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_bytes": rss, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
