"""Live migration of a decoding request between decode instances, as the router runs it.

    pre-copy stages   the source publishes the request's full blocks while it keeps decoding
                      (``precopy``); the destination reserves blocks and copies them beside its
                      own steps (``receive_stage``); each later stage brings only the blocks
                      completed since, until fewer than ``min_stage_blocks`` are new or
                      ``max_stages`` were run
    final stage       at a step boundary the request leaves the source's batch; the blocks not
                      copied yet and its whole state are published (``export(first_block)``); the
                      destination reserves room for all of it at once or refuses, pulls the
                      rest, and the request joins its batch (``admit_migration``)
    commit            the destination's step report lists the request as admitted: the source
                      frees its blocks
    without a copy    a request still waiting for its prefill leaves its source with its state
                      (``withdraw``: re-dispatched), and a short running one may leave the batch
                      without publishing its KV (``detach``: migrated by recompute); the
                      destination queues it for a prefill over its tokens so far (``recompute``);
                      commit and resume as above (a withdrawn request resumes in the source's queue)
    resume            anything failed before commit: the request goes on at the source, where
                      its blocks still are; the destination drops what it reserved

Ownership moves with the token index: tokens below the hand-over index count only from the
source, the rest only from the destination (``RequestRecord.owned_by``), so no token is lost or
repeated even when reports arrive out of order. An admission whose reply is lost is resolved by
asking the destination to drop the request (``abort``) before resuming it on the source, never by
running it on both; admissions reported meanwhile are ignored. Migrations in and out of an
instance are bounded by a budget of blocks (and bytes) in flight, not by a lock.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from tandem.cluster.rebalance import Budget, Move, move_kind
from tandem.cluster.requests import Migration, RequestRecord
from tandem.cluster.spec_types import MigrationSpec
from tandem.engine.block_manager import blocks_needed
from tandem.transfer.protocol import remote_cause


DRAIN_POLL_S = 0.05  # a drain looks for requests left to move this often


class MigrationError(RuntimeError):
    """A migration could not start or was given up before commit; the request goes on where it was."""


class MigrationDesk:
    """The router's side of migrations. ``decode`` is the router's in-service decode pool (a live
    view); ``free_everywhere(rec)`` aborts a request on every instance that holds it."""

    def __init__(self, decode: dict, dispatch, free_everywhere, call_timeout_s: float,
                 policy: MigrationSpec = MigrationSpec()) -> None:
        self.decode, self.dispatch = decode, dispatch
        self.free_everywhere, self.call_timeout_s = free_everywhere, call_timeout_s
        self.policy = policy
        self.block_bytes = 0  # bytes of one KV block (learned from the instances' stats)
        self.in_flight: dict[str, int] = {}  # instance -> blocks migrating in or out
        self.totals = {"started": 0, "committed": 0, "resumed": 0, "cancelled": 0}  # since the router started

    def budget(self) -> Budget:
        """What migrations may still move: ``max_blocks_in_flight`` per instance, fewer if
        ``max_bytes_in_flight`` says so."""
        limit = self.policy.max_blocks_in_flight
        if self.block_bytes:
            limit = min(limit, self.policy.max_bytes_in_flight // self.block_bytes)
        return Budget(limit, dict(self.in_flight))

    async def start(self, rec: RequestRecord, to: str | None, kind: str | None = None) -> str:
        """Move a request on a decode instance to ``to`` (or the decode instance with the most
        free blocks other than its own); returns the destination once it has taken the request.
        ``kind`` (default: ``redispatch`` for one with no token yet, ``recompute`` for a context of
        at most ``migration.recompute_max_tokens``, else ``copy``) is how. MigrationError (the
        request goes on at its source) if it cannot."""
        source = rec.decode_instance
        if rec.stage != "decode" or rec.migration is not None or rec.done:
            raise MigrationError(f"request {rec.request_id!r} is not decoding (stage {rec.stage})")
        dest = to or self.dispatch.freest_decode(exclude=source)
        if dest is None or dest == source or dest not in self.decode or source not in self.decode:
            raise MigrationError(f"no decode instance to move request {rec.request_id!r} to "
                                 f"(from {source}, asked for {to})")
        kind = self._kind(rec, kind)
        num_blocks = blocks_needed(len(rec.prompt_ids) + len(rec.token_ids), self.dispatch.block_size)
        if not self.budget().allows(Move(rec.request_id, source, dest, num_blocks, "", kind)):
            raise MigrationError(f"request {rec.request_id!r}: moving its {num_blocks} blocks from "
                                 f"{source} to {dest} would pass migration.max_blocks_in_flight/"
                                 f"max_bytes_in_flight; try again once other migrations are done")
        mig = rec.migration = Migration(source, dest, time.time(), num_blocks, kind)
        for instance_id in (source, dest):
            self.in_flight[instance_id] = self.in_flight.get(instance_id, 0) + mig.budget_blocks
        self.totals["started"] += 1
        if kind == "copy":
            copied = await self._precopy(rec, mig)
            await self._final(rec, mig, copied)
        else:
            await self._without_kv(rec, mig)
        return rec.decode_instance

    def _kind(self, rec: RequestRecord, asked: str | None) -> str:
        """The policy's kind (a request with no token yet has no KV to move: it is re-dispatched,
        or refuses if it started meanwhile), or the one ``asked`` for a running request."""
        kind = move_kind(not rec.token_ids, len(rec.prompt_ids) + len(rec.token_ids), self.policy)
        if asked is None or kind == "redispatch":
            return kind
        if asked not in ("copy", "recompute"):
            raise MigrationError(f"request {rec.request_id!r} is running: it moves by 'copy' or "
                                 f"'recompute', not {asked!r}")
        return asked

    async def _call(self, instance_id: str, method: str, *args):
        """A call to a decode instance, bounded; its remote error unwrapped."""
        if instance_id not in self.decode:
            raise RuntimeError(f"{instance_id} is out of service")
        try:
            return await asyncio.wait_for(getattr(self.decode[instance_id], method).remote(*args),
                                          self.call_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{instance_id} did not answer {method} in {self.call_timeout_s:g}s") from None
        except Exception as exc:
            raise remote_cause(exc) from None

    async def _precopy(self, rec: RequestRecord, mig: Migration) -> int:
        """Run the pre-copy stages; how many blocks the destination has. Raises MigrationError
        (after cleaning up both sides) if a stage fails or the request ended meanwhile."""
        rid = rec.request_id
        while mig.stages < self.policy.max_stages:
            if self._ended(rec, mig):
                raise self._give_up(rec, mig, "it ended during its pre-copy stages")
            try:
                handle = await self._call(mig.source, "precopy", rid, mig.copied_blocks,
                                          self.policy.min_stage_blocks)
            except Exception as exc:
                raise self._give_up(rec, mig, f"{mig.source} could not copy it: {exc}") from None
            if handle is None:
                break  # too few new blocks: the final stage copies them
            try:
                if self._ended(rec, mig):
                    raise MigrationError("it ended during its pre-copy stages")
                mig.copied_blocks = await self._call(mig.dest, "receive_stage", rid, handle)
                mig.stages += 1
            except Exception as exc:
                raise self._give_up(rec, mig, f"{mig.dest} did not take stage {mig.stages}: {exc}") from None
            finally:  # calls may run out of order: this releases only this stage
                if mig.source in self.decode:
                    self.decode[mig.source].release_stage.remote(rid, handle.first_block)
        return mig.copied_blocks

    async def _final(self, rec: RequestRecord, mig: Migration, copied: int) -> None:
        """Pause the request on the source and hand it and its last blocks to the destination."""
        if self._ended(rec, mig):
            raise self._give_up(rec, mig, "it ended during its pre-copy stages")
        state, handle = await self._leave(rec, mig, "export", copied)
        self.dispatch.reserve_decode(mig.dest, rec.request_id, handle.num_tokens + 1)
        await self._hand_to(rec, mig, "admit_migration", state, handle)

    async def _without_kv(self, rec: RequestRecord, mig: Migration) -> None:
        """Take the request off the source with its state only (withdrawn from the queue, or
        detached from the batch) and have the destination queue it for a prefill."""
        state = await self._leave(rec, mig, "withdraw" if mig.kind == "redispatch" else "detach")
        self.dispatch.reserve_decode(mig.dest, rec.request_id, len(state.token_ids) + 1)
        await self._hand_to(rec, mig, "recompute", state)

    async def _leave(self, rec: RequestRecord, mig: Migration, how: str, *args):
        """The source's ``how`` call; on success the request is paused there and the
        destination owns its tokens from the hand-over index on. Raises MigrationError."""
        rid = rec.request_id
        try:
            left = await self._call(mig.source, how, rid, *args)
        except Exception as exc:  # finished meanwhile, preempted, started, the source is gone or slow
            if mig.source in self.decode:  # it may have left: back in (a no-op if not; and if this
                self.decode[mig.source].resume_export.remote(rid)  # runs first, the source resumes
                # it by itself after its hold timeout)
            raise self._give_up(rec, mig, f"it could not leave {mig.source}: {exc}") from None
        if self._ended(rec, mig):  # aborted while leaving: nothing to move
            self.free_everywhere(rec)
            raise MigrationError(f"request {rid!r} ended while leaving {mig.source}")
        state = left[0] if how == "export" else left
        mig.phase, mig.pause = "final", time.time()
        mig.index = len(state.token_ids) - state.num_prompt_tokens
        rec.owners = (rec.owners or [(mig.source, 0)]) + [(mig.dest, mig.index)]
        rec.decode_instance = mig.dest
        return left

    async def _hand_to(self, rec: RequestRecord, mig: Migration, method: str, *args) -> None:
        """The destination takes the paused request; a refusal resumes it at the source, a lost
        reply is resolved before it does."""
        try:
            await self._call(mig.dest, method, *args)
        except ValueError as exc:  # no room there (or its stages were dropped): nothing taken
            self.resume(rec, f"{mig.dest} refused it: {exc}")
        except Exception as exc:
            await self._resolve_lost_admission(rec, mig, exc)

    async def _resolve_lost_admission(self, rec: RequestRecord, mig: Migration, exc: BaseException) -> None:
        """The admission's reply never came: the destination may or may not have the request.
        Have it drop the request, then resume on the source; the destination's tokens past the
        hand-over never count (ownership), and any admission it reports meanwhile is ignored."""
        if rec.migration is not mig:
            return  # its commit (or a failure) was reported meanwhile: settled already
        mig.phase = "resolving"
        rec.owners.append((mig.source, mig.index))  # from now on nothing the destination sends counts
        try:
            await self._call(mig.dest, "abort", rec.request_id)
            outcome = "dropped there"
        except Exception as abort_exc:
            outcome = f"unreachable ({abort_exc}); its tokens will not count"
        self.resume(rec, f"{mig.dest} did not confirm the admission ({exc}); {outcome}")

    def _ended(self, rec: RequestRecord, mig: Migration) -> bool:
        return rec.done or rec.migration is not mig

    def _give_up(self, rec: RequestRecord, mig: Migration, why: str) -> MigrationError:
        """A migration given up before the final stage: the request never left the source;
        drop what the destination reserved. The error to raise."""
        if rec.migration is mig:
            rec.migration = None
            self.totals["cancelled"] += 1
            self._end(mig)
        if mig.dest in self.decode:
            self.decode[mig.dest].abort.remote(rec.request_id)
        return MigrationError(f"request {rec.request_id!r} stays on {mig.source}: {why}")

    def _end(self, mig: Migration) -> None:
        for instance_id in (mig.source, mig.dest):
            left = self.in_flight.get(instance_id, 0) - mig.budget_blocks
            if left > 0:
                self.in_flight[instance_id] = left
            else:
                self.in_flight.pop(instance_id, None)

    def committed(self, rec: RequestRecord, instance_id: str, joined: float | None = None) -> bool:
        """The destination admitted the request (it joined the batch at ``joined``, the start of
        its first step there): free it on the source. False if this admission is not a
        migration's (a resolving migration's admission is swallowed)."""
        mig = rec.migration
        if mig is None or mig.dest != instance_id or mig.phase == "precopy":
            return False
        if mig.phase == "resolving":
            return True  # being dropped there: the request resumes on the source
        rec.migration = None
        self._end(mig)
        self.totals["committed"] += 1
        self.dispatch.admitted(mig.source, rec.request_id)  # a re-dispatched one's estimate there
        if mig.source in self.decode:
            self.decode[mig.source].release_export.remote(rec.request_id)
        now = time.time()
        joined = max(mig.pause, joined or now)
        rec.migrations.append({"from": mig.source, "to": mig.dest, "kind": mig.kind, "start": mig.start,
                               "pause": mig.pause,
                               "joined": joined, "commit": now, "downtime_s": joined - mig.pause,
                               "stages": mig.stages,
                               "blocks": mig.num_blocks, "precopied_blocks": mig.copied_blocks})
        return True

    def resume(self, rec: RequestRecord, why: str) -> bool:
        """The final stage failed before commit: the request decodes on at the source (or fails,
        if the source is gone too). False if the request was not past its pre-copy stages."""
        mig = rec.migration
        if mig is None or mig.phase == "precopy":
            return False
        rec.migration = None
        self._end(mig)
        self.totals["resumed"] += 1
        self.dispatch.forget(rec)
        if rec.done:
            return True
        if mig.dest in self.decode:
            self.decode[mig.dest].abort.remote(rec.request_id)  # anything it still holds
        if mig.source not in self.decode:
            rec.finish("error", f"request {rec.request_id!r}: its migration failed ({why}) and its "
                                f"source {mig.source} is gone")
            self.free_everywhere(rec)
            return True
        rec.owners.append((mig.source, mig.index))
        rec.decode_instance = mig.source
        self.decode[mig.source].resume_export.remote(rec.request_id)
        return True

    async def drain(self, left_on: Callable[[], list[RequestRecord]], timeout_s: float) -> dict:
        """Move every request ``left_on()`` lists (an instance dispatch no longer feeds) elsewhere
        as soon as it is decoding; how many moved and how many were still there at ``timeout_s``
        (requests that finished meanwhile are neither)."""
        moved, deadline = 0, time.monotonic() + timeout_s
        while (left := left_on()) and time.monotonic() < deadline:
            for rec in left:
                if rec.stage != "decode" or rec.migration is not None:
                    continue
                try:
                    await self.start(rec, None)
                    moved += 1
                except MigrationError:
                    pass  # finished, or not running yet (waiting, preempted): tried again
            await asyncio.sleep(DRAIN_POLL_S)
        return {"moved": moved, "left": len(left_on())}

    def abort_both(self, rec: RequestRecord) -> None:
        """A request that ended (aborted, failed) while migrating: free it on both sides."""
        mig = rec.migration
        if mig is None:
            return
        rec.migration = None
        self._end(mig)
        self.totals["cancelled"] += 1
        for instance_id in (mig.source, mig.dest):
            if instance_id in self.decode:
                self.decode[instance_id].abort.remote(rec.request_id)
