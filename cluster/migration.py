"""Live migration of a decoding request between decode instances, as the router runs it
(stop-and-copy: one stage).

    export on the source     at a step boundary the request leaves the source's batch; its KV is
                             published and its blocks held there (``DecodeInstance.export``)
    admit on the destination the destination pulls the KV beside its running steps (a normal
                             admission) and the request joins its batch
    commit                   the destination's step report lists the request as admitted: the
                             source frees its blocks
    resume                   the pull failed or the destination was lost before commit: the request
                             decodes on at the source, where its blocks still are

Ownership moves with the token index: tokens below the hand-over index count only from the
source, the rest only from the destination (``RequestRecord.owned_by``), so no token is lost or
repeated even when reports arrive out of order. An abort reaches both sides.
"""
from __future__ import annotations

import asyncio
import time
from tandem.cluster.requests import Migration, RequestRecord
from tandem.transfer.protocol import remote_cause


class MigrationError(RuntimeError):
    """A migration could not start; the request goes on where it was."""


class MigrationDesk:
    """The router's side of migrations. ``decode`` is the router's in-service decode pool (a live
    view); ``free_everywhere(rec)`` aborts a request on every instance that holds it."""

    def __init__(self, decode: dict, dispatch, free_everywhere, call_timeout_s: float) -> None:
        self.decode, self.dispatch = decode, dispatch
        self.free_everywhere, self.call_timeout_s = free_everywhere, call_timeout_s
        self.totals = {"started": 0, "committed": 0, "resumed": 0}  # since the router started

    async def start(self, rec: RequestRecord, to: str | None) -> str:
        """Move a decoding request to ``to`` (or the decode instance with the most free blocks
        other than its own); returns the destination once the destination has queued it."""
        source = rec.decode_instance
        if rec.stage != "decode" or rec.migration is not None:
            raise MigrationError(f"request {rec.request_id!r} is not decoding (stage {rec.stage})")
        dest = to or self.dispatch.freest_decode(exclude=source)
        if dest is None or dest == source or dest not in self.decode:
            raise MigrationError(f"no decode instance to move request {rec.request_id!r} to "
                                 f"(from {source}, asked for {to})")
        try:
            state, handle = await asyncio.wait_for(self.decode[source].export.remote(rec.request_id),
                                                   self.call_timeout_s)
        except Exception as exc:  # finished meanwhile, preempted, or the source is gone
            raise MigrationError(f"request {rec.request_id!r} could not leave {source}: "
                                 f"{remote_cause(exc)}") from None
        index = len(state.token_ids) - state.num_prompt_tokens
        rec.migration = Migration(source, dest, index, time.time(), state.num_kv_tokens)
        if rec.done:  # aborted or timed out while exporting: nothing to move
            self.free_everywhere(rec)
            return source
        self.totals["started"] += 1
        rec.owners = (rec.owners or [(source, 0)]) + [(dest, index)]
        rec.decode_instance = dest
        self.dispatch.reserve_decode(dest, rec.request_id, handle.num_tokens + 1)
        try:
            refused = dict(await asyncio.wait_for(self.decode[dest].admit.remote([(state, handle)]),
                                                  self.call_timeout_s))
        except Exception as exc:
            refused = {rec.request_id: str(remote_cause(exc))}
        if rec.request_id in refused:
            self.resume(rec, f"{dest} refused it: {refused[rec.request_id]}")
        return dest

    def committed(self, rec: RequestRecord, instance_id: str) -> bool:
        """The destination admitted the request: free it on the source. False if this admission
        is not a migration's."""
        migration = rec.migration
        if migration is None or migration.dest != instance_id:
            return False
        rec.migration = None
        self.totals["committed"] += 1
        if migration.source in self.decode:
            self.decode[migration.source].release_export.remote(rec.request_id)
        rec.migrations.append({"from": migration.source, "to": migration.dest, "start": migration.start,
                               "commit": time.time(), "num_tokens": migration.num_tokens})
        return True

    def resume(self, rec: RequestRecord, why: str) -> bool:
        """The migration failed before commit: the request decodes on at the source (or fails,
        if the source is gone too). False if the request was not migrating."""
        migration = rec.migration
        if migration is None:
            return False
        rec.migration = None
        self.totals["resumed"] += 1
        self.dispatch.forget(rec)
        if rec.done:
            return True
        if migration.source not in self.decode:
            rec.finish("error", f"request {rec.request_id!r}: its migration failed ({why}) and its "
                                f"source {migration.source} is gone")
            self.free_everywhere(rec)
            return True
        rec.owners.append((migration.source, migration.index))
        rec.decode_instance = migration.source
        self.decode[migration.source].resume_export.remote(rec.request_id)
        return True

    def abort_source(self, rec: RequestRecord) -> None:
        """An aborted request that was migrating: free it on the source too."""
        migration = rec.migration
        if migration is not None and migration.source in self.decode:
            self.decode[migration.source].abort.remote(rec.request_id)
