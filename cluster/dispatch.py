"""Dispatch policies (pure): which prefill instance gets a prompt, which decode instance a request.

Loads are the router's own estimates between reports: prefill = tokens queued and not yet
prefilled; decode = free blocks last reported minus blocks of requests sent but not yet admitted
(``most_free_blocks``), or that per request it runs or is about to take (``freeness``, Llumnix's
measure: the blocks each of its requests can still grow by).
"""
from __future__ import annotations

import itertools

from tandem.engine.block_manager import blocks_needed

PREFILL_POLICIES = ("least_tokens", "round_robin")
DECODE_POLICIES = ("most_free_blocks", "freeness", "round_robin")


class Dispatcher:
    def __init__(self, prefill_policy: str = "least_tokens", decode_policy: str = "most_free_blocks") -> None:
        if prefill_policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy {prefill_policy!r} not in {PREFILL_POLICIES}")
        if decode_policy not in DECODE_POLICIES:
            raise ValueError(f"decode policy {decode_policy!r} not in {DECODE_POLICIES}")
        self.prefill_policy, self.decode_policy = prefill_policy, decode_policy
        self.block_size = 16
        self.queued: dict[str, dict[str, int]] = {}  # prefill id -> request id -> tokens
        self.free: dict[str, int] = {}  # decode id -> free blocks last reported
        self.running: dict[str, int] = {}  # decode id -> requests it last reported holding
        self.reserved: dict[str, dict[str, int]] = {}  # decode id -> request id -> blocks
        # Running sums of the two tables above, so a pick costs O(instances), not O(requests).
        self.queued_total: dict[str, int] = {}
        self.reserved_total: dict[str, int] = {}
        self._rr_prefill = self._rr_decode = None
        self.draining: set[str] = set()  # decode instances that take no new requests

    def add_prefill(self, instance_id: str) -> None:
        self.queued.setdefault(instance_id, {})
        self.queued_total.setdefault(instance_id, 0)

    def set_free_blocks(self, instance_id: str, free: int, block_size: int | None = None,
                        running: int | None = None) -> None:
        if block_size:
            self.block_size = block_size
        self.free[instance_id] = free
        if running is not None:
            self.running[instance_id] = running
        self.reserved.setdefault(instance_id, {})
        self.reserved_total.setdefault(instance_id, 0)

    def pick_prefill(self, request_id: str, num_tokens: int) -> str:
        if not self.queued:
            raise RuntimeError("no live prefill instance to serve the request")
        if self.prefill_policy == "round_robin":
            self._rr_prefill = self._rr_prefill or itertools.cycle(sorted(self.queued))
            target = next(self._rr_prefill)
        else:
            target = min(self.queued, key=lambda i: (self.queued_total[i], i))
        _put(self.queued[target], self.queued_total, target, request_id, num_tokens)
        return target

    def pick_decode(self, request_id: str, num_tokens: int) -> str:
        open_ = [i for i in self.free if i not in self.draining]
        if not open_:
            raise RuntimeError("no live decode instance to serve the request")
        if self.decode_policy == "round_robin":
            self._rr_decode = self._rr_decode or itertools.cycle(sorted(open_))
            target = next(self._rr_decode)
            while target in self.draining:
                target = next(self._rr_decode)
        elif self.decode_policy == "freeness":
            target = max(open_, key=lambda i: (self.freeness(i), i))
        else:
            target = max(open_, key=lambda i: (self.free_estimate(i), i))
        _put(self.reserved[target], self.reserved_total, target, request_id,
             blocks_needed(num_tokens, self.block_size))
        return target

    def freest_decode(self, exclude: str | None = None) -> str | None:
        """The decode instance with the most free blocks (estimated), other than ``exclude``."""
        candidates = [i for i in self.free if i != exclude and i not in self.draining]
        return max(candidates, key=lambda i: (self.free_estimate(i), i), default=None)

    def reserve_decode(self, instance_id: str, request_id: str, num_tokens: int) -> None:
        """Count a request sent to a decode instance against its free blocks until admitted."""
        if instance_id in self.reserved:
            _put(self.reserved[instance_id], self.reserved_total, instance_id, request_id,
                 blocks_needed(num_tokens, self.block_size))

    def free_estimate(self, instance_id: str) -> int:
        return self.free[instance_id] - self.reserved_total[instance_id]

    def freeness(self, instance_id: str) -> float:
        """Estimated free blocks per request the instance runs or is about to take."""
        requests = self.running.get(instance_id, 0) + len(self.reserved[instance_id])
        return self.free_estimate(instance_id) / max(1, requests)

    def num_estimates(self) -> int:
        """Requests the estimates count now (queued for prefill or reserved for decode)."""
        return sum(map(len, self.queued.values())) + sum(map(len, self.reserved.values()))

    def prefill_done(self, instance_id: str, request_id: str) -> None:
        _pop(self.queued, self.queued_total, instance_id, request_id)

    def admitted(self, instance_id: str, request_id: str) -> None:
        _pop(self.reserved, self.reserved_total, instance_id, request_id)

    def drain(self, instance_id: str) -> None:
        """Send no new request to this decode instance (its own keep running)."""
        self.draining.add(instance_id)
        self._rr_decode = None

    def remove_instance(self, instance_id: str) -> None:
        self.draining.discard(instance_id)
        for table in (self.queued, self.free, self.running, self.reserved, self.queued_total,
                      self.reserved_total):
            table.pop(instance_id, None)
        self._rr_prefill = self._rr_decode = None

    def forget(self, rec) -> None:
        """Drop every estimate that counts this request."""
        for instance_id in list(self.queued):
            _pop(self.queued, self.queued_total, instance_id, rec.request_id)
        for instance_id in list(self.reserved):
            _pop(self.reserved, self.reserved_total, instance_id, rec.request_id)


def _put(table: dict[str, int], totals: dict[str, int], instance_id: str, request_id: str, amount: int) -> None:
    totals[instance_id] += amount - table.get(request_id, 0)
    table[request_id] = amount


def _pop(tables: dict[str, dict[str, int]], totals: dict[str, int], instance_id: str, request_id: str) -> None:
    amount = tables.get(instance_id, {}).pop(request_id, None)
    if amount is not None:
        totals[instance_id] -= amount
