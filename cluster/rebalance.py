"""The rebalancing policy (pure, no Ray): which decoding requests to move between decode instances.

Load follows Llumnix's *freeness*: an instance's free KV blocks, minus the blocks its queued
admissions will take, per running request: how many more blocks each of its requests can grow
by before it must preempt. A pass pairs the least free instance with the freest and moves the
source's shortest-running requests (the fewest tokens to copy, the most tokens still to come)
until the pair is balanced. Triggers: a gap in freeness over ``imbalance_threshold``, any
preemption on the source since the last pass, and a drain (every request leaves). A move that
would leave the destination less free than the source is never made: it would only swap the
imbalance and be moved back next pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from tandem.cluster.spec_types import MigrationSpec


@dataclass(frozen=True)
class Running:
    """A request decoding on an instance, as the rebalancer weighs it."""

    request_id: str
    num_blocks: int  # KV blocks it holds (what a migration copies)
    num_output_tokens: int  # how long it has been running


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    free_blocks: int
    demand_blocks: int = 0  # blocks its queued admissions and incoming migrations will take
    running: tuple[Running, ...] = ()  # requests that may move (decoding, not migrating)
    num_running: int = 0  # every request on it, movable or not (at least len(running))
    preempted: int = 0  # preemptions since the last pass
    draining: bool = False

    @property
    def freeness(self) -> float:
        """Free blocks per running request, after queued demand (Llumnix); may be negative."""
        return (self.free_blocks - self.demand_blocks) / max(1, self.num_running, len(self.running))

    def without(self, req: Running) -> InstanceLoad:
        return replace(self, free_blocks=self.free_blocks + req.num_blocks,
                       running=tuple(r for r in self.running if r is not req),
                       num_running=max(0, max(self.num_running, len(self.running)) - 1))

    def with_(self, req: Running) -> InstanceLoad:
        return replace(self, free_blocks=self.free_blocks - req.num_blocks,
                       num_running=max(self.num_running, len(self.running)) + 1)


@dataclass(frozen=True)
class Move:
    request_id: str
    source: str
    dest: str
    num_blocks: int
    why: str  # "drain", "imbalance" or "preemption"


@dataclass
class Budget:
    """Blocks each instance may have in flight (out plus in) on top of what is already moving."""

    limit: int
    used: dict[str, int] = field(default_factory=dict)

    def allows(self, move: Move) -> bool:
        return all(self.used.get(i, 0) + move.num_blocks <= self.limit for i in (move.source, move.dest))

    def take(self, move: Move) -> None:
        for i in (move.source, move.dest):
            self.used[i] = self.used.get(i, 0) + move.num_blocks


def plan_moves(loads: list[InstanceLoad], policy: MigrationSpec, budget: Budget) -> list[Move]:
    """The moves of one pass: drains first, then imbalance and preemption relief, pair by pair,
    each within ``budget`` (which the moves take from) and at most ``policy.max_moves_per_pass``."""
    by_id = {load.instance_id: load for load in loads}
    moves: list[Move] = []
    for load in loads:
        if load.draining:
            _drain(load.instance_id, by_id, budget, moves)
    if policy.enabled:
        _relieve(by_id, policy, budget, moves)
    return moves[:policy.max_moves_per_pass] if policy.enabled else moves


def _destinations(by_id: dict[str, InstanceLoad], source: str) -> list[InstanceLoad]:
    return [load for i, load in by_id.items() if i != source and not load.draining]


def _drain(source: str, by_id: dict[str, InstanceLoad], budget: Budget, moves: list[Move]) -> None:
    """Every movable request on ``source`` to the freest open instance at the time."""
    for req in _shortest_first(by_id[source].running):
        dests = _destinations(by_id, source)
        if not dests:
            return
        dest = max(dests, key=lambda d: (d.freeness, d.instance_id))
        if dest.free_blocks - dest.demand_blocks < req.num_blocks:
            continue  # does not fit anywhere now: a later pass tries again
        _take(Move(req.request_id, source, dest.instance_id, req.num_blocks, "drain"), req, by_id,
              budget, moves)


def _relieve(by_id: dict[str, InstanceLoad], policy: MigrationSpec, budget: Budget,
             moves: list[Move]) -> None:
    """Pair the least free instance with the freest, move its shortest-running requests until
    the pair is balanced; then the next pair, until no pair needs a move."""
    done: set[str] = set()  # sources already relieved (or found unmovable) this pass
    while len(moves) < policy.max_moves_per_pass:
        open_ = [load for i, load in by_id.items() if not load.draining and i not in done]
        if len(open_) < 2:
            return
        source = min(open_, key=lambda load: (load.freeness, load.instance_id))
        dest = max(_destinations(by_id, source.instance_id),
                   key=lambda load: (load.freeness, load.instance_id))
        why = _trigger(source, dest, policy)
        if why is None:
            return  # the least free instance needs nothing: nor does any other
        if not _move_from(source, dest, why, policy, by_id, budget, moves):
            done.add(source.instance_id)


def _trigger(source: InstanceLoad, dest: InstanceLoad, policy: MigrationSpec) -> str | None:
    if dest.freeness <= source.freeness:
        return None
    if source.preempted:
        return "preemption"
    if dest.freeness - source.freeness > policy.imbalance_threshold:
        return "imbalance"
    return None


def _move_from(source: InstanceLoad, dest: InstanceLoad, why: str, policy: MigrationSpec,
               by_id: dict[str, InstanceLoad], budget: Budget, moves: list[Move]) -> bool:
    """Move the source's shortest-running request that keeps the pair in order; False if none."""
    for req in _shortest_first(source.running):
        src_after, dest_after = source.without(req), dest.with_(req)
        if dest_after.freeness < src_after.freeness:
            continue  # would swap the imbalance: it would only be moved back
        if dest.free_blocks - dest.demand_blocks < req.num_blocks:
            continue
        if _take(Move(req.request_id, source.instance_id, dest.instance_id, req.num_blocks, why), req,
                 by_id, budget, moves):
            return True
    return False


def _take(move: Move, req: Running, by_id: dict[str, InstanceLoad], budget: Budget,
          moves: list[Move]) -> bool:
    """Record ``move`` (if the budget allows) and update both loads as if it had happened."""
    if not budget.allows(move):
        return False
    budget.take(move)
    moves.append(move)
    by_id[move.source] = replace(by_id[move.source].without(req), preempted=0)  # relieved
    by_id[move.dest] = by_id[move.dest].with_(req)
    return True


def _shortest_first(running: tuple[Running, ...]) -> list[Running]:
    return sorted(running, key=lambda r: (r.num_output_tokens, r.num_blocks, r.request_id))
