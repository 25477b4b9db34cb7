"""Faults at each step of the migration protocol (cluster/migration.py), without Ray: the router's
MigrationDesk drives two real decode instances through in-process stand-ins for their actor
handles, which can kill an instance, hold or hang a call, refuse it, or lose its reply. Whatever
happens, nothing hangs, the client's tokens are transformers' (none lost or repeated) or a clear
error, and every KV block is free on the survivors."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest

from tandem.cluster.dispatch import Dispatcher
from tandem.cluster.migration import MigrationDesk, MigrationError
from tandem.cluster.requests import RequestRecord
from tandem.cluster.spec_types import MigrationSpec
from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy

PROMPT = [5, 17, 42, 9, 33, 7, 81, 12, 60, 3, 14, 15, 92, 65, 35, 89, 79]
MAX_TOKENS = 60
BLOCKS = 48
POLICY = MigrationSpec(min_stage_blocks=1, max_stages=2)
# (how the request moves, the side and the call a fault is injected at): every protocol step
HOLD_POINTS = [("copy", "A", "precopy"), ("copy", "B", "receive_stage"), ("copy", "A", "export"),
               ("copy", "B", "admit_migration"), ("recompute", "A", "detach"), ("recompute", "B", "recompute"),
               ("redispatch", "A", "withdraw"), ("redispatch", "B", "recompute")]


class Died(RuntimeError):
    """What a call to a dead instance raises (Ray raises RayActorError)."""


class Instance:
    """A decode instance and the faults its stand-in handle injects, by method name:
    ``("hold", event)`` waits for the event first, ``"hang"`` never answers, ``("refuse", exc)``
    raises instead, ``"lose_reply"`` does the work and then raises as a lost reply would."""

    def __init__(self, name: str, inst: DecodeInstance) -> None:
        self.name, self.inst, self.dead, self.faults = name, inst, False, {}
        self.entered: dict[str, asyncio.Event] = {}

    def __getattr__(self, method: str):
        instance = self

        class _Remote:
            @staticmethod
            def remote(*args):
                return asyncio.ensure_future(instance.call(method, args))
        return _Remote

    async def call(self, method: str, args: tuple):
        self.entered.setdefault(method, asyncio.Event()).set()
        fault = self.faults.get(method)
        if fault == "hang":
            await asyncio.Event().wait()
        if isinstance(fault, tuple) and fault[0] == "hold":
            await fault[1].wait()
        if self.dead:
            raise Died(f"{self.name} died")
        if isinstance(fault, tuple) and fault[0] == "refuse":
            raise fault[1]
        result = self.run(method, args)
        if isinstance(result, Future):
            await asyncio.wrap_future(result)
            result = args[1].first_block + args[1].num_blocks
        if fault == "lose_reply":
            raise TimeoutError(f"{self.name}: the reply to {method} was lost")
        return result

    def run(self, method: str, args: tuple):
        return getattr(self.inst, method)(*args)


class World:
    """Two decode instances (A, B), the router's desk and record of one request, and a loop that
    steps every live instance and applies its reports as the router does."""

    def __init__(self, model_dir, b_blocks: int = BLOCKS, timeout_s: float = 5.0) -> None:
        transport = LocalTransport()
        self.blocks = {"A": BLOCKS, "B": b_blocks}
        self.instances = {name: Instance(name, DecodeInstance(
            Engine(model_dir, EngineConfig(dtype="float32", num_blocks=n, block_size=4)),
            {"local": transport}, hold_timeout_s=2.0)) for name, n in self.blocks.items()}
        self.decode = dict(self.instances)  # in service
        self.paused: set[str] = set()  # instances not stepped for now
        self.dispatch = Dispatcher()
        for name, n in self.blocks.items():
            self.dispatch.set_free_blocks(name, n, 4)
        self.desk = MigrationDesk(self.decode, self.dispatch, self.free_everywhere, timeout_s, POLICY)
        self.rec = RequestRecord("r", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                             ignore_eos=True))
        self.rec.stage, self.rec.decode_instance = "decode", "A"
        self.instances["A"].inst.submit("r", PROMPT, self.rec.params)

    def free_everywhere(self, rec: RequestRecord) -> None:
        self.desk.abort_both(rec)
        if rec.decode_instance in self.decode:
            self.decode[rec.decode_instance].abort.remote(rec.request_id)

    def kill(self, name: str) -> None:
        """The instance dies and leaves service; its requests fail unless a migration to it can
        resume at the source (what the router's _fail_requests_on does)."""
        self.instances[name].dead = True
        self.decode.pop(name)
        self.dispatch.remove_instance(name)
        if self.rec.decode_instance == name and not self.rec.done:
            if not self.desk.resume(self.rec, f"{name} died"):
                self.rec.finish("error", f"decode instance {name} died")
                self.free_everywhere(self.rec)

    async def step_all(self) -> None:
        for name, handle in list(self.decode.items()):
            if name in self.paused:
                continue
            if handle.inst.has_work():
                self.on_report(name, handle.inst.step())
            else:
                handle.inst.reclaim_expired()

    def on_report(self, name: str, report) -> None:
        for rid in report.admitted:
            self.dispatch.admitted(name, rid)
            self.desk.committed(self.rec, name)
        for rid, error in report.failed:
            self.desk.resume(self.rec, f"{name} could not pull it: {error}")
        for delta in report.deltas:
            if self.rec.owned_by(name, delta.index):
                self.rec.add_delta(delta, 0.0)
            elif name != self.rec.decode_instance and not delta.finished:
                self.decode[name].abort.remote(delta.request_id)

    async def run_until(self, predicate, limit_s: float = 60.0) -> None:
        async def loop():
            while not predicate():
                await self.step_all()
                await asyncio.sleep(0.001)
        await asyncio.wait_for(loop(), limit_s)

    async def decode_tokens(self, count: int) -> None:
        await self.run_until(lambda: len(self.rec.token_ids) >= count or self.rec.done)

    async def migrate(self) -> asyncio.Future:
        """Start moving the request A -> B beside the steps."""
        return asyncio.ensure_future(self.desk.start(self.rec, "B"))

    async def migrate_held_at(self, step: str) -> tuple[asyncio.Future, asyncio.Event]:
        """Decode a while, start the migration and hold it as it reaches ``step`` (a call to the
        source for precopy and export, to the destination otherwise) until the event is set."""
        await self.decode_tokens(12)
        gate = asyncio.Event()
        side = "A" if step in ("precopy", "export") else "B"
        self.instances[side].faults[step] = ("hold", gate)
        migration = await self.migrate()
        await self.run_until(lambda: step in self.instances[side].entered)
        return migration, gate

    async def finish(self, migration: asyncio.Future) -> None:
        """Step until the request and the migration are over and the survivors hold nothing."""
        await self.run_until(lambda: self.rec.done and migration.done())
        await self.run_until(self.settled)

    def settled(self) -> bool:
        for name, handle in self.decode.items():
            handle.inst.reclaim_expired()
            if (handle.inst.engine.num_free_blocks != self.blocks[name] or handle.inst.engine.stats()["held"]
                    or handle.inst.stats()["migrating_out"]):
                return False
        return not self.desk.in_flight

    def close(self) -> None:
        for handle in self.instances.values():
            handle.inst.close()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]


def _run(scenario, world: World):
    async def main():
        try:
            return await scenario(world)
        finally:
            world.close()
    return asyncio.run(main())


def _moved_or_stayed(world: World, reference, moved: bool | None) -> None:
    """The request finished whole, moved (or not; None: either) and nothing is held anywhere."""
    assert (world.rec.finish_reason, world.rec.error) == ("length", None)
    assert world.rec.token_ids == reference  # no token lost or repeated
    assert moved is None or (len(world.rec.migrations) == 1) is moved
    assert world.settled()


def test_without_faults_the_request_moves_with_pre_copy(tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(12)
        migration = await w.migrate()
        await w.finish(migration)
        assert migration.result() == "B"
        (record,) = w.rec.migrations
        assert record["stages"] >= 1 and record["precopied_blocks"] >= 1
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=True)


@pytest.mark.parametrize("kind,side,step", HOLD_POINTS)
def test_the_destination_dies_at_each_step(tiny_llama_dir, reference, kind, side, step):
    async def scenario(w: World):
        migration, gate = await _start_move(w, kind, (side, step))
        w.kill("B")
        gate.set()
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)


@pytest.mark.parametrize("step", ["precopy", "receive_stage", "export"])
def test_the_source_dies_at_each_step_before_commit(tiny_llama_dir, step):
    async def scenario(w: World):
        migration, gate = await w.migrate_held_at(step)
        w.kill("A")
        gate.set()
        await w.finish(migration)
        with pytest.raises(MigrationError):
            migration.result()
    world = World(tiny_llama_dir)
    _run(scenario, world)
    assert world.rec.finish_reason == "error" and "decode instance A died" in world.rec.error
    assert world.settled()  # B freed what it had reserved


def test_the_source_dies_after_the_destination_took_the_request(tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(12)
        migration = await w.migrate()
        await w.run_until(lambda: migration.done())
        w.kill("A")  # after the final stage: the request is B's now
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=True)


@pytest.mark.parametrize("kind,side,step", HOLD_POINTS)
def test_an_abort_at_each_step_frees_both_sides(tiny_llama_dir, kind, side, step):
    async def scenario(w: World):
        migration, gate = await _start_move(w, kind, (side, step))
        w.rec.finish("abort")
        w.free_everywhere(w.rec)
        gate.set()
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    assert world.rec.finish_reason == "abort"
    assert world.settled() and all(not h.inst.engine.request_ids() for h in world.decode.values())


def test_a_request_that_finishes_during_pre_copy_cancels_the_migration(tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(12)
        gate = asyncio.Event()
        w.instances["B"].faults["receive_stage"] = ("hold", gate)
        migration = await w.migrate()
        await w.run_until(lambda: w.rec.done)  # it finishes on A while B's stage is held
        gate.set()
        await w.finish(migration)
        with pytest.raises(MigrationError, match="ended"):
            migration.result()
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)
    assert world.desk.totals["cancelled"] == 1


def test_a_destination_without_room_for_the_first_stage_leaves_the_request_on_the_source(
        tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(20)
        migration = await w.migrate()
        await w.finish(migration)
        with pytest.raises(MigrationError, match="no room"):
            migration.result()
    world = World(tiny_llama_dir, b_blocks=3)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)


def test_a_destination_that_fills_up_before_the_final_stage_refuses_it(tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(20)
        gate = asyncio.Event()
        w.instances["B"].faults["admit_migration"] = ("hold", gate)
        migration = await w.migrate()
        await w.run_until(lambda: "admit_migration" in w.instances["B"].entered)
        b = w.instances["B"].inst.engine
        assert b.reserve("other", b.num_free_blocks * 4)  # another request takes every free block
        gate.set()
        await w.run_until(migration.done)
        b.release("other")
        await w.finish(migration)
        assert w.desk.totals["resumed"] == 1
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)


@pytest.mark.parametrize("side,step", [("B", "admit_migration"), ("A", "export")])
def test_a_lost_reply_leaves_the_request_running_once_on_the_source(tiny_llama_dir, reference, side, step):
    """B took the request, or A paused it, and the router never heard: B is asked to drop it, or
    A to put it back in its batch, and it goes on on A only (unless B's commit arrived first)."""
    async def scenario(w: World):
        await w.decode_tokens(12)
        w.instances[side].faults[step] = "lose_reply"
        migration = await w.migrate()
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=None if side == "B" else False)


def test_a_lost_reply_from_an_unreachable_destination_never_runs_the_request_twice(tiny_llama_dir, reference):
    async def scenario(w: World):
        await w.decode_tokens(12)
        w.instances["B"].faults.update(admit_migration="lose_reply", abort=("refuse", Died("B unreachable")))
        migration = await w.migrate()
        await w.run_until(migration.done)
        w.instances["B"].faults.clear()  # reachable again: its tokens are not counted, it is told to stop
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=None)


@pytest.mark.parametrize("kind,side,step", [("copy", "A", "precopy"), ("copy", "B", "receive_stage"),
                                            ("copy", "A", "export"), ("recompute", "A", "detach"),
                                            ("redispatch", "A", "withdraw")])
def test_a_call_that_never_answers_times_out_and_the_request_goes_on(tiny_llama_dir, reference, kind, side, step):
    async def scenario(w: World):
        w.instances[side].faults[step] = "hang"
        migration, _ = await _start_move(w, kind)
        await w.finish(migration)
        with pytest.raises(MigrationError, match="did not answer"):
            migration.result()
    world = World(tiny_llama_dir, timeout_s=0.5)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)


# -- moves without a KV copy: a running request recomputed there, a waiting one re-dispatched -----

LEAVE = {"copy": "precopy", "recompute": "detach", "redispatch": "withdraw"}  # the source's first step


async def _start_move(w: World, kind: str, hold: tuple[str, str] | None = None):
    """Start moving the request A -> B by ``kind`` (running for a copy or a recompute, still
    queued for a re-dispatch), holding the call ``hold`` = (side, method) until the returned
    event is set."""
    if kind != "redispatch":
        await w.decode_tokens(12)
    else:
        w.paused.add("A")  # the request stays queued there until it is asked to leave
    gate = asyncio.Event()
    if hold is not None:
        w.instances[hold[0]].faults[hold[1]] = ("hold", gate)
    migration = asyncio.ensure_future(w.desk.start(w.rec, "B", kind))
    side, method = hold or ("A", LEAVE[kind])
    await w.run_until(lambda: method in w.instances[side].entered)
    w.paused.clear()
    return migration, gate




@pytest.mark.parametrize("kind", ["recompute", "redispatch"])
def test_a_move_without_kv_gives_transformers_tokens_and_frees_the_source(tiny_llama_dir, reference, kind):
    async def scenario(w: World):
        migration, _ = await _start_move(w, kind)
        await w.finish(migration)
        assert migration.result() == "B"
        (record,) = w.rec.migrations
        assert record["kind"] == kind and record["stages"] == 0
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=True)


@pytest.mark.parametrize("kind,side,step", HOLD_POINTS[4:])
def test_a_lost_reply_mid_move_without_kv_runs_the_request_once(tiny_llama_dir, reference, kind, side, step):
    """The source let the request go, or the destination queued it, and the router never heard:
    the source takes it back (a withdrawn one into its queue), or the destination is told to drop it."""
    async def scenario(w: World):
        w.instances[side].faults[step] = "lose_reply"
        migration, _ = await _start_move(w, kind)
        await w.finish(migration)
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=None if side == "B" else False)


@pytest.mark.parametrize("kind", ["recompute", "redispatch"])
def test_a_destination_that_can_never_hold_the_request_refuses_it(tiny_llama_dir, reference, kind):
    async def scenario(w: World):
        migration, _ = await _start_move(w, kind)
        await w.finish(migration)
        assert migration.result() == "A" and w.desk.totals["resumed"] == 1
    world = World(tiny_llama_dir, b_blocks=3)  # 12 tokens of KV: not the prompt and its output
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)


def test_a_request_that_started_before_the_router_heard_is_not_redispatched(tiny_llama_dir, reference):
    async def scenario(w: World):
        report = w.instances["A"].inst.step()  # prefilled; its first token not reported yet
        with pytest.raises(MigrationError, match="not waiting here"):
            await w.desk.start(w.rec, "B")
        w.on_report("A", report)
        await w.finish(asyncio.ensure_future(asyncio.sleep(0)))
    world = World(tiny_llama_dir)
    _run(scenario, world)
    _moved_or_stayed(world, reference, moved=False)
