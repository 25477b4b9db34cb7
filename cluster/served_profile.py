"""`tandem profile SPEC --served`: calibrate the planner on launched instances, not a bare engine.

Why: a served instance is slower than its engine alone (the step loop, one report per decode step,
router hops, other actors on the same cores), so a bare-engine profile makes the simulator
under-predict a served cluster (measurements: benchmarks/RESULTS.md, "cluster/served_profile.py").

How: launch one prefill and one decode instance with the spec's settings and time them through the
router with probes. A single prompt gives a one-sequence prefill sample; then, with the prefill
instance paused, ``batch`` identical-length prompts queue there and, resumed, are prefilled as one
batch and decode in lockstep: the batch's prefill_start/prefill_end (stamped by the prefill actor)
is a prefill sample and the requests' TPOT the decode step period at that batch size as served.
The samples are fitted with placement/calibrate.py's forms, like the bare-engine profile.

Interference: the probes above time each phase while the other is idle, but in service both run at
once, and on CPU they share the node's memory bandwidth. So the profile also measures, A/B on the
same shapes, a single prompt's prefill alone and beside a decoding batch, and that batch's TPOT
alone and while single prompts keep the prefill instance busy; the slowdowns become the profile's
``interference``, which the simulator applies to instances sharing a node.

Router delay: each single prompt's TTFT beyond its prefill step (router hops, step-loop wake-ups)
becomes the profile's ``router_delay_s``, which the simulator adds to every TTFT.
"""
from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import msgspec

# (single prompt length, batch, prompt length): batch and context vary independently so the fit
# can tell the per-sequence and per-token terms apart.
PROBES = ((256, 1, 224), (192, 16, 64), (160, 4, 240), (128, 12, 160))
PROBE_TOKENS = 32
# (decoding batch, its prompt length, prompt length of the prefills beside it)
INTERFERENCE_SHAPE = (8, 96, 192)
_CALL_TIMEOUT_S = 30.0  # bound on every control call to the prefill actor


def single_pair(spec):
    """The spec reduced to one prefill + one decode instance (tp=pp=1), named ``<name>-profile``:
    probes need every request to meet the same two instances."""
    from tandem.cluster.spec_types import SpecError

    if spec.mode != "disaggregated":
        raise SpecError("mode", "--served profiles a disaggregated spec (prefill and decode pools)")
    one = dict(replicas=1, tp=1, pp=1)
    return msgspec.structs.replace(
        spec, name=f"{spec.name}-profile", placement="explicit", planning=None,
        prefill=msgspec.structs.replace(spec.prefill, **one),
        decode=msgspec.structs.replace(spec.decode, **one))


def fit_probe_shapes(probes, tokens: int, limit: int):
    """Shrink probe prompts that would not fit the model's context (small test models)."""
    room = limit - tokens - 1
    return tuple((min(solo, room), batch, min(length, room)) for solo, batch, length in probes)


def prefill_seconds(result) -> float:
    """A completion's prefill batch duration, stamped by the prefill actor."""
    return result.metrics["prefill_end"] - result.metrics["prefill_start"]


def router_seconds(result) -> float:
    """A lone request's time to first token outside its prefill step (dispatch, step-loop
    wake-up, report): both terms are durations, each on one clock, so node clocks may differ."""
    return max(1e-6, result.metrics["ttft"] - prefill_seconds(result))


def _greedy(tokens: int):
    from tandem.engine.params import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)


async def probe(client, prefill, prompt, probes=PROBES, tokens: int = PROBE_TOKENS) -> list:
    """One pass of the probes against the pair whose prefill actor is ``prefill``; returns
    ProfileSamples (prefill and decode)."""
    from tandem.placement.calibrate import ProfileSample

    one, params = _greedy(1), _greedy(tokens)
    samples = []
    for solo_len, batch, length in probes:
        solo = await client.agenerate(prompt(solo_len), one)
        samples.append(ProfileSample("prefill", 1, 1, (solo_len,), prefill_seconds(solo)))
        samples.append(ProfileSample("router", 1, 1, (solo_len,), router_seconds(solo)))
        results = await _one_batch(client, prefill, [prompt(length) for _ in range(batch)], params)
        durations = {round(prefill_seconds(r), 6) for r in results}
        if len(durations) != 1:
            continue  # the token budget split the batch: no clean sample
        samples.append(ProfileSample("prefill", 1, 1, (length,) * batch, durations.pop()))
        ctx = length + 1 + tokens // 2  # context at the middle decode step
        samples.append(ProfileSample("decode", 1, 1, (ctx,) * batch,
                                     statistics.median(r.metrics["tpot"] for r in results)))
    return samples


async def _one_batch(client, prefill, prompts: list, params) -> list:
    """Queue every prompt at the paused prefill instance, then resume it: one prefill batch that
    then decodes in lockstep, whatever the speed of the model."""
    return await asyncio.gather(*await _start_batch(client, prefill, prompts, params))


async def _start_batch(client, prefill, prompts: list, params) -> list:
    """``_one_batch`` without waiting for the results: returns the requests' futures."""
    await asyncio.wait_for(prefill.pause.remote(True), _CALL_TIMEOUT_S)
    try:
        pending = [asyncio.ensure_future(client.agenerate(p, params)) for p in prompts]
        await _wait_prefill_stats(prefill, lambda s: s["waiting"] >= len(prompts),
                                  f"probe batch of {len(prompts)} did not reach the prefill queue")
    finally:
        await asyncio.wait_for(prefill.pause.remote(False), _CALL_TIMEOUT_S)
    return pending


async def _wait_prefill_stats(prefill, ready, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + _CALL_TIMEOUT_S
    while not ready(await asyncio.wait_for(prefill.stats.remote(), _CALL_TIMEOUT_S)):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} within {_CALL_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)


class InterferenceSample(msgspec.Struct, frozen=True):
    """One A/B pass: prefill seconds of single prompts alone and beside a decoding batch, and that
    batch's TPOT alone and beside the prefills."""

    prefill_alone: tuple[float, ...]
    prefill_beside: tuple[float, ...]
    tpot_alone: float
    tpot_beside: float


async def probe_interference(client, prefill, prompt, profile, shape=INTERFERENCE_SHAPE,
                             limit: int | None = None, solo_repeats: int = 3) -> InterferenceSample:
    """Time each phase alone, then both at once. Beside: a lockstep batch decodes while single
    prompts are prefilled one after another; a prefill that was still running when the batch
    finished is left out (it was not beside decode the whole time). The prefills alone run both
    before and after that (``solo_repeats`` each): the host's speed drifts within a pass too.
    The batch decodes long enough for several lone requests, timed end to end just before it."""
    batch, length, solo_len = shape
    one = _greedy(1)
    firsts = [await _timed(client.agenerate(prompt(solo_len), one)) for _ in range(solo_repeats)]
    alone = [prefill_seconds(result) for result, _ in firsts]
    request_s = statistics.median(seconds for _, seconds in firsts)
    params = _greedy(interference_tokens(profile, shape, limit, request_s=request_s))
    tpot_alone = _median_tpot(await _one_batch(client, prefill, [prompt(length) for _ in range(batch)], params))
    decoding = await _start_batch(client, prefill, [prompt(length) for _ in range(batch)], params)
    # Its KV pulled by the decode instance: from here on decode is busy until the batch finishes.
    await _wait_prefill_stats(prefill, lambda s: s["waiting"] + s["running"] + s["held"] == 0,
                              "the decoding batch did not leave the prefill instance")
    beside = []
    while not all(f.done() for f in decoding):
        result = await client.agenerate(prompt(solo_len), one)
        if not all(f.done() for f in decoding):
            beside.append(prefill_seconds(result))
    tpot_beside = _median_tpot(await asyncio.gather(*decoding))
    alone += [prefill_seconds(await client.agenerate(prompt(solo_len), one)) for _ in range(solo_repeats)]
    return InterferenceSample(tuple(alone), tuple(beside), tpot_alone, tpot_beside)


async def _timed(call):
    """``(result, seconds)`` of an awaitable, on this process's clock."""
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


def _median_tpot(results) -> float:
    return statistics.median(r.metrics["tpot"] for r in results)


def interference_tokens(profile, shape=INTERFERENCE_SHAPE, limit: int | None = None,
                        prefills: int = 8, request_s: float = 0.0) -> int:
    """Decode tokens for the interference batch: long enough for ``prefills`` single prefills
    beside it, each costing its prefill step by the profile's fit or ``request_s`` (a lone
    request's measured round trip: router hops and the reply too) if longer; at least
    PROBE_TOKENS, within the context ``limit``."""
    batch, length, solo_len = shape
    entry = profile.entry(1, 1)
    prefill_s = max(entry.prefill.at(solo_len, solo_len * solo_len), request_s)
    step_s = entry.decode.at(batch, batch * (length + PROBE_TOKENS))
    tokens = max(PROBE_TOKENS, math.ceil(prefills * prefill_s / step_s))
    return tokens if limit is None else max(2, min(tokens, limit - length - 1))


def fit_interference(samples: list[InterferenceSample]):
    """Median over the A/B passes of each pass's slowdown (>= 0): prefill, median beside over
    median alone; decode, TPOT beside over alone. Per pass, so that drift between passes minutes
    apart does not mix into one ratio. ValueError when no prefill ran beside decode."""
    from tandem.placement.sim_core import Interference

    prefill = [statistics.median(s.prefill_beside) / statistics.median(s.prefill_alone)
               for s in samples if s.prefill_alone and s.prefill_beside]
    if not prefill:
        raise ValueError("interference probes: no prefill ran beside a decoding batch "
                         "(the batch finished too soon); raise the decode tokens")
    decode = statistics.median(s.tpot_beside / s.tpot_alone for s in samples)
    return Interference(prefill=max(0.0, statistics.median(prefill) - 1), decode=max(0.0, decode - 1))


def profile_served(spec, repeats: int = 2, seed: int = 0, probes=PROBES, tokens: int = PROBE_TOKENS,
                   interference_shape=INTERFERENCE_SHAPE):
    """Launch ``single_pair(spec)`` on the connected Ray cluster, probe it ``repeats`` times (fits,
    then interference), shut it down, and return the CalibratedProfile. ValueError if too few
    clean samples."""
    from tandem.cluster.deployment import model_directory
    from tandem.cluster.launcher import Cluster
    from tandem.engine.config import load_config
    from tandem.engine.engine import context_limit

    pair = single_pair(spec)
    model_dir = model_directory(pair)
    config = load_config(model_dir)
    limit = context_limit(config, None)
    shapes = fit_probe_shapes(probes, tokens, limit)
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, config.vocab_size) for _ in range(n)]

    cluster = Cluster.from_spec(pair)
    try:
        client = cluster.client(timeout_s=600)
        prefill = next(h for name, h in cluster.actors.items() if "-prefill-" in name)

        async def run():
            samples = []
            for _ in range(repeats):
                samples += await probe(client, prefill, prompt, shapes, tokens)
            profile = _fit(samples, spec)
            shape = fit_interference_shape(interference_shape, limit)
            room = _batch_room(pair, shape[0], limit)
            passes = [await probe_interference(client, prefill, prompt, profile, shape, room)
                      for _ in range(repeats)]
            return msgspec.structs.replace(profile, interference=fit_interference(passes))

        return asyncio.run(run())
    finally:
        cluster.shutdown()


def _fit(samples: list, spec):
    from tandem.placement.calibrate import fit_profile

    return fit_profile(samples, model=spec.model.name or spec.model.path or "",
                       hardware=f"{spec.decode.device} served instance, num_cpus {spec.decode.num_cpus}",
                       dtype=spec.model.dtype)


def _batch_room(pair, batch: int, limit: int) -> int:
    """Longest context each of ``batch`` sequences may reach: the model's context, and the decode
    instance's cache when the spec sizes it."""
    blocks = pair.decode.num_blocks
    return limit if blocks is None else min(limit, blocks * pair.decode.block_size // batch)


def fit_interference_shape(shape, limit: int):
    """Shrink the interference probe's prompts to small test models' context (room to decode)."""
    batch, length, solo_len = shape
    return batch, min(length, limit // 2), min(solo_len, limit - 2)
