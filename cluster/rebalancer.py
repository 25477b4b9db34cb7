"""The router's periodic rebalancing pass: its view of each decode instance's load (the free
blocks each last reported, the requests the router knows run there) goes through the pure policy
(cluster/rebalance.py), and the moves it picks start as live migrations."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from tandem.cluster.migration import MigrationDesk, MigrationError
from tandem.cluster.rebalance import InstanceLoad, Move, Running, plan_moves
from tandem.cluster.requests import RequestRecord
from tandem.engine.block_manager import blocks_needed

log = logging.getLogger(__name__)


class Rebalancer:
    def __init__(self, desk: MigrationDesk, records: Callable[[], Iterable[RequestRecord]]) -> None:
        """``records()`` are the router's live requests."""
        self.desk, self.dispatch, self.records = desk, desk.dispatch, records
        self.preemptions: dict[str, int] = {}  # instance -> preemptions it last reported
        self._seen: dict[str, int] = {}  # instance -> preemptions at the previous pass
        self.moves_started = 0

    def on_report(self, instance_id: str, preemptions: int) -> None:
        self.preemptions[instance_id] = preemptions

    def loads(self) -> list[InstanceLoad]:
        """Each decode instance in service as the policy sees it now."""
        on: dict[str, list[RequestRecord]] = {iid: [] for iid in self.desk.decode}
        incoming: dict[str, int] = {}  # blocks of migrations pre-copying to each instance (after
        # that the dispatcher counts them among the instance's reservations)
        for rec in self.records():
            if not rec.done and rec.decode_instance in on:
                on[rec.decode_instance].append(rec)
            if not rec.done and rec.migration is not None and rec.migration.phase == "precopy":
                dest = rec.migration.dest
                incoming[dest] = incoming.get(dest, 0) + rec.migration.num_blocks
        loads = []
        for iid, recs in on.items():
            growth = {r.request_id: self._growth(r) for r in recs if r.token_ids}
            movable = tuple(self._weigh(r, growth.get(r.request_id, 0)) for r in recs
                            if r.stage == "decode" and r.migration is None)
            preempted = self.preemptions.get(iid, 0) - self._seen.get(iid, 0)
            demand = self.dispatch.reserved_total.get(iid, 0) + incoming.get(iid, 0)
            loads.append(InstanceLoad(iid, self.dispatch.free.get(iid, 0), demand, movable, len(recs),
                                      max(0, preempted), iid in self.dispatch.draining, sum(growth.values())))
        return loads

    def _weigh(self, rec: RequestRecord, growth: int) -> Running:
        """A request as the policy sees it; one with no token yet waits for its prefill (colocated
        mode: it may have started meanwhile, and then it refuses to leave)."""
        context = len(rec.prompt_ids) + len(rec.token_ids)
        if not rec.token_ids:
            since = rec.migrations[-1]["joined"] if rec.migrations else rec.arrival  # sent here
            return Running(rec.request_id, blocks_needed(context + 1, self.dispatch.block_size), 0,
                           context, waiting=True, waited_s=max(0.0, time.time() - since))
        return Running(rec.request_id, blocks_needed(context, self.dispatch.block_size), len(rec.token_ids),
                       context, growth)

    def _growth(self, rec: RequestRecord) -> int:
        """Blocks a running request will grow by over the next ``growth_horizon_tokens`` tokens
        (fewer if its ``max_tokens`` ends it sooner)."""
        horizon = self.desk.policy.growth_horizon_tokens
        if not horizon:
            return 0
        context = len(rec.prompt_ids) + len(rec.token_ids)
        left = max(0, rec.params.max_tokens - len(rec.token_ids))
        size = self.dispatch.block_size
        return blocks_needed(context + min(horizon, left), size) - blocks_needed(context, size)

    def pass_once(self) -> list[Move]:
        """Plan one pass and start its migrations (each runs on as its own task)."""
        moves = plan_moves(self.loads(), self.desk.policy, self.desk.budget())
        self._seen = dict(self.preemptions)
        by_id = {rec.request_id: rec for rec in self.records()}
        for move in moves:
            rec = by_id.get(move.request_id)
            if rec is not None:
                self.moves_started += 1
                asyncio.ensure_future(self._migrate(rec, move))
        return moves

    async def _migrate(self, rec: RequestRecord, move: Move) -> None:
        try:
            await self.desk.start(rec, move.dest, move.kind)
        except MigrationError as exc:
            log.debug("rebalancing move %s (%s) not made: %s", move.request_id, move.why, exc)

    async def run(self) -> None:
        """Every ``migration.interval_s``, while the policy is enabled and two instances serve."""
        while True:
            await asyncio.sleep(self.desk.policy.interval_s)
            if len(self.desk.decode) >= 2:
                try:
                    self.pass_once()
                except Exception:
                    log.exception("rebalancing pass failed")
