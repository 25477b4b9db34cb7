"""The router's roster of instances: which are in service (dispatched to) and which are benched
(out of service, checked on each round until they answer healthy again or are gone for good).

Runs on the router's event loop. Taking an instance out of service calls ``on_out(role, id, why)``,
through which the router fails that instance's requests; a benched instance that answers healthy
first drops every request it still holds (the router failed them when it left), then rejoins.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from tandem.cluster.dispatch import Dispatcher
from tandem.cluster.health import BENCH, DROP, Verdict, health_verdict
from tandem.cluster.launcher_config import NAMESPACE, LaunchConfig, pool_of_instance
from tandem.transfer.protocol import HealthReport

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # the longest the router waits on one call to an instance


class Roster:
    def __init__(self, config: LaunchConfig, dispatch: Dispatcher,
                 on_out: Callable[[str, str, str], None]) -> None:
        self.config, self.dispatch, self.on_out = config, dispatch, on_out
        self.group_of = pool_of_instance(config)  # each instance's pool, by id
        self.prefill: dict = {}  # in service, by id
        self.decode: dict = {}
        self.benched: dict[str, tuple[str, object, str]] = {}  # id -> (role, handle, why)
        self.incarnations: dict[str, str] = {}  # id -> the incarnation in service (HealthReport)
        self._rejoining: set[str] = set()

    def pools(self) -> tuple[tuple[str, dict], ...]:
        return ("prefill", self.prefill), ("decode", self.decode)

    def restartable(self, iid: str) -> bool:
        group = self.group_of.get(iid)
        return group is not None and group.max_restarts > 0

    def handle(self, iid: str):
        """The instance's handle, in service or benched (None if neither)."""
        return self.prefill.get(iid) or self.decode.get(iid) or self.benched.get(iid, (None, None))[1]

    def add(self, role: str, iid: str, handle, stats: dict) -> None:
        """Put an instance in service (dispatch learns its free blocks)."""
        (self.prefill if role == "prefill" else self.decode)[iid] = handle
        self.incarnations[iid] = stats.get("incarnation")
        if role == "prefill":
            self.dispatch.add_prefill(iid)
        else:
            self.dispatch.set_free_blocks(iid, stats["free_blocks"], self.group_of[iid].engine.block_size)

    def bench(self, role: str, iid: str, handle, why: str) -> None:
        self.benched[iid] = (role, handle, why)

    def take_out(self, role: str, iid: str, verdict: Verdict) -> None:
        """Out of service (its requests fail through ``on_out``); benched if it may come back."""
        handle = (self.prefill if role == "prefill" else self.decode).pop(iid, None)
        if handle is None:
            return
        log.error("%s instance %s is out of service: it %s", role, iid, verdict.why)
        self.dispatch.remove_instance(iid)
        self.on_out(role, iid, verdict.why)
        if verdict.action == BENCH:
            self.bench(role, iid, handle, verdict.why)

    def step_failed(self, iid: str, failure: str) -> None:
        """An instance reported that its step failed: out now (benched when Ray may restart it,
        which it asks for by exiting)."""
        for role, pool in self.pools():
            if iid in pool:
                action = BENCH if self.restartable(iid) else DROP
                self.take_out(role, iid, Verdict(action, f"its step failed ({failure})"))

    async def check(self) -> None:
        """One health round over every instance (answered beside its step loop, so a long step
        is no death): one that failed, died, restarted or stalled leaves service; a benched one
        that answers healthy rejoins."""
        timeout_s = self.config.health_timeout_s
        entries = [(role, iid, h) for role, pool in self.pools() for iid, h in pool.items()]
        entries += [(role, iid, h) for iid, (role, h, _) in self.benched.items()]
        answers = await asyncio.gather(
            *(asyncio.wait_for(h.health.remote(), timeout_s) for _, _, h in entries),
            return_exceptions=True)
        for (role, iid, handle), answer in zip(entries, answers):
            verdict = health_verdict(answer, restartable=self.restartable(iid),
                                     known_incarnation=self.incarnations.get(iid), timeout_s=timeout_s)
            if iid not in self.benched:
                if verdict is not None:
                    self.take_out(role, iid, verdict)
            elif isinstance(answer, HealthReport) and answer.failure is None:
                asyncio.ensure_future(self._rejoin(role, iid, handle))
            elif verdict is not None and verdict.action == DROP:
                log.error("%s instance %s is gone for good: it %s", role, iid, verdict.why)
                self.benched.pop(iid, None)

    async def _rejoin(self, role: str, iid: str, handle) -> None:
        if iid in self._rejoining:
            return
        self._rejoining.add(iid)
        try:
            dropped = await asyncio.wait_for(handle.abort_all.remote(), CALL_TIMEOUT_S)
            stats = await asyncio.wait_for(handle.stats.remote(), CALL_TIMEOUT_S)
        except Exception as exc:  # not ready after all: the next round tries again
            log.warning("%s instance %s could not rejoin yet: %r", role, iid, exc)
            return
        finally:
            self._rejoining.discard(iid)
        if self.benched.pop(iid, None) is not None:
            self.add(role, iid, handle, stats)
            log.warning("%s instance %s is back in service (it dropped %d stale requests)", role, iid, dropped)


def named_instances(names: list[str]) -> dict:
    """The live actors among ``names`` in tandem's namespace (a restarted router finds its
    instances so); one that is gone is logged and left out."""
    import ray

    found = {}
    for name in names:
        try:
            found[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            log.error("instance %s is gone (no actor by that name)", name)
    return found
