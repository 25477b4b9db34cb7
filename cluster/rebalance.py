"""The rebalancing policy (pure, no Ray): which decoding requests to move between decode instances.

Load follows Llumnix's *freeness*: an instance's free KV blocks, minus the blocks its queued
admissions will take (and, with a growth horizon, the blocks its running requests will grow into
over it), per running request: how many more blocks each of its requests can grow by before it
must preempt. A pass pairs the least free instance with the freest and moves the source's
requests that wait for their prefill (re-dispatched: nothing to copy), then its shortest-running
ones (the fewest tokens to copy, the most tokens still to come) until the pair is balanced; a
running request moves by KV copy, or by recompute when its context is at most
``recompute_max_tokens``. A move goes only where the request and its growth fit. Triggers: a
gap in freeness over ``imbalance_threshold``, any preemption on the source since the last pass, a
drain (every request leaves), and a request queued longer than a pass interval while another
instance has nothing queued (a stalled or swamped instance's queue goes where it starts now). A
move that would leave the destination less free than the source is never made: it would only swap
the imbalance and be moved back next pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from tandem.cluster.spec_types import MigrationSpec


@dataclass(frozen=True)
class Running:
    """A request on an instance that may move, as the rebalancer weighs it."""

    request_id: str
    num_blocks: int  # KV blocks it holds (what a migration copies); waiting: blocks it will take
    num_output_tokens: int  # how long it has been running
    num_tokens: int = 0  # its context, prompt and output (what a recompute prefills)
    growth_blocks: int = 0  # blocks it will grow by within the growth horizon
    waiting: bool = False  # waits for its prefill: holds no KV, counted in the demand
    waited_s: float = 0.0  # waiting: how long since it was sent to this instance


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    free_blocks: int
    demand_blocks: int = 0  # blocks its queued admissions and incoming migrations will take
    running: tuple[Running, ...] = ()  # requests that may move (decoding or waiting, not migrating)
    num_running: int = 0  # every request on it, movable or not (at least len(running))
    preempted: int = 0  # preemptions since the last pass
    draining: bool = False
    growth_blocks: int = -1  # blocks all its requests will grow by (-1: those of ``running``)
    num_queued: int = -1  # requests waiting for their prefill (-1: those of ``running``)

    def __post_init__(self) -> None:
        if self.growth_blocks < 0:
            object.__setattr__(self, "growth_blocks", sum(r.growth_blocks for r in self.running))
        if self.num_queued < 0:
            object.__setattr__(self, "num_queued", sum(r.waiting for r in self.running))

    @property
    def room(self) -> int:
        """Free blocks after queued demand and growth."""
        return self.free_blocks - self.demand_blocks - self.growth_blocks

    @property
    def freeness(self) -> float:
        """Free blocks per request, after queued demand and growth (Llumnix); may be negative."""
        return self.room / max(1, self.num_running, len(self.running))

    def without(self, req: Running) -> InstanceLoad:
        held, demand = (0, req.num_blocks) if req.waiting else (req.num_blocks, 0)
        return replace(self, free_blocks=self.free_blocks + held, demand_blocks=self.demand_blocks - demand,
                       growth_blocks=self.growth_blocks - req.growth_blocks,
                       num_queued=self.num_queued - req.waiting,
                       running=tuple(r for r in self.running if r is not req),
                       num_running=max(0, max(self.num_running, len(self.running)) - 1))

    def with_(self, req: Running) -> InstanceLoad:
        held, demand = (0, req.num_blocks) if req.waiting else (req.num_blocks, 0)
        return replace(self, free_blocks=self.free_blocks - held, demand_blocks=self.demand_blocks + demand,
                       growth_blocks=self.growth_blocks + req.growth_blocks,
                       num_queued=self.num_queued + req.waiting,
                       num_running=max(self.num_running, len(self.running)) + 1)

    def fits(self, req: Running) -> bool:
        """Whether ``req`` and its growth fit in what is left here."""
        return self.room >= req.num_blocks + req.growth_blocks


@dataclass(frozen=True)
class Move:
    request_id: str
    source: str
    dest: str
    num_blocks: int
    why: str  # "drain", "queue", "imbalance" or "preemption"
    kind: str = "copy"

    @property
    def copied_blocks(self) -> int:
        """Blocks the move sends between the instances (what the budget bounds)."""
        return self.num_blocks if self.kind == "copy" else 0


def move_kind(waiting: bool, num_tokens: int, policy: MigrationSpec) -> str:
    """How a request moves: ``redispatch`` if it waits for its prefill (no KV yet), ``recompute``
    if its context is at most ``recompute_max_tokens``, else ``copy`` (its KV)."""
    if waiting:
        return "redispatch"
    recompute = policy.recompute_max_tokens and num_tokens <= policy.recompute_max_tokens  # 0: never
    return "recompute" if recompute else "copy"


def _kind(req: Running, policy: MigrationSpec) -> str:
    return move_kind(req.waiting, req.num_tokens, policy)


@dataclass
class Budget:
    """Blocks each instance may have in flight (out plus in) on top of what is already moving."""

    limit: int
    used: dict[str, int] = field(default_factory=dict)

    def allows(self, move: Move) -> bool:
        return all(self.used.get(i, 0) + move.copied_blocks <= self.limit for i in (move.source, move.dest))

    def take(self, move: Move) -> None:
        for i in (move.source, move.dest):
            self.used[i] = self.used.get(i, 0) + move.copied_blocks


def plan_moves(loads: list[InstanceLoad], policy: MigrationSpec, budget: Budget) -> list[Move]:
    """The moves of one pass: drains first, then imbalance and preemption relief, pair by pair,
    each within ``budget`` (which the moves take from) and at most ``policy.max_moves_per_pass``."""
    by_id = {load.instance_id: load for load in loads}
    moves: list[Move] = []
    for load in loads:
        if load.draining:
            _drain(load.instance_id, by_id, policy, budget, moves)
    if policy.enabled:
        _unqueue(by_id, policy, budget, moves)
        _relieve(by_id, policy, budget, moves)
    return moves[:policy.max_moves_per_pass] if policy.enabled else moves


def _destinations(by_id: dict[str, InstanceLoad], source: str) -> list[InstanceLoad]:
    return [load for i, load in by_id.items() if i != source and not load.draining]


def _drain(source: str, by_id: dict[str, InstanceLoad], policy: MigrationSpec, budget: Budget,
           moves: list[Move]) -> None:
    """Every movable request on ``source`` to the freest open instance at the time (it must fit
    there now; its growth may not: a drain cannot wait for room to grow)."""
    for req in _shortest_first(by_id[source].running):
        dests = _destinations(by_id, source)
        if not dests:
            return
        dest = max(dests, key=lambda d: (d.freeness, d.instance_id))
        if dest.free_blocks - dest.demand_blocks < req.num_blocks:
            continue  # does not fit anywhere now: a later pass tries again
        _take(Move(req.request_id, source, dest.instance_id, req.num_blocks, "drain", _kind(req, policy)),
              req, by_id, budget, moves)


def _unqueue(by_id: dict[str, InstanceLoad], policy: MigrationSpec, budget: Budget,
             moves: list[Move]) -> None:
    """Requests queued on an instance for longer than a pass interval (stalled, or swamped) go to
    the freest instance that had nothing queued and has room for them, oldest first."""
    unqueued = {i for i, load in by_id.items() if not load.num_queued}
    for source_id in sorted(by_id):
        stale = [r for r in by_id[source_id].running if r.waiting and r.waited_s > policy.interval_s]
        for req in sorted(stale, key=lambda r: (-r.waited_s, r.request_id)):
            dests = [d for d in _destinations(by_id, source_id) if d.instance_id in unqueued and d.fits(req)]
            if len(moves) >= policy.max_moves_per_pass or not dests:
                return
            dest = max(dests, key=lambda d: (d.freeness, d.instance_id))
            _take(Move(req.request_id, source_id, dest.instance_id, req.num_blocks, "queue", "redispatch"),
                  req, by_id, budget, moves)


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
        if not dest.fits(req):
            continue
        move = Move(req.request_id, source.instance_id, dest.instance_id, req.num_blocks, why,
                    _kind(req, policy))
        if _take(move, req, by_id, budget, moves):
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
    """Waiting requests first (nothing to copy), then the shortest-running."""
    return sorted(running, key=lambda r: (not r.waiting, r.num_output_tokens, r.num_blocks, r.request_id))
