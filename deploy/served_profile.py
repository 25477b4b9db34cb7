"""`tandem profile SPEC --served`: calibrate the planner on launched instances, not a bare engine.

Why: a served instance is slower than its engine alone (the step loop, one report per decode step,
router hops, other actors on the same cores). On CPU, a profile of the bare engine made the
simulator under-predict a real 1P+1D cluster's TTFT/TPOT percentiles by 11-34%; with a profile of
the served instances TPOT came within 10% on a quiet host, TTFT within 8-28% (benchmarks/RESULTS.md,
"Simulator vs real cluster").

How: launch one prefill and one decode instance with the spec's settings and time them through the
router with probes. A single prompt gives a one-sequence prefill sample; then, with the prefill
instance paused, ``batch`` identical-length prompts queue there and, resumed, are prefilled as one
batch and decode in lockstep: the batch's prefill_start/prefill_end (stamped by the prefill actor)
is a prefill sample and the requests' TPOT the decode step period at that batch size as served. The samples are fitted with placement/calibrate.py's forms, like the bare-engine profile.
"""
from __future__ import annotations

import asyncio
import random
import statistics

import msgspec

# (single prompt length, batch, prompt length): batch and context vary independently so the fit
# can tell the per-sequence and per-token terms apart.
PROBES = ((256, 1, 224), (192, 16, 64), (160, 4, 240), (128, 12, 160))
PROBE_TOKENS = 32
_CALL_TIMEOUT_S = 30.0  # bound on every control call to the prefill actor


def single_pair(spec):
    """The spec reduced to one prefill + one decode instance (tp=pp=1), named ``<name>-profile``:
    probes need every request to meet the same two instances."""
    from cluster.spec_types import SpecError

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


async def probe(client, prefill, prompt, probes=PROBES, tokens: int = PROBE_TOKENS) -> list:
    """One pass of the probes against the pair whose prefill actor is ``prefill``; returns
    ProfileSamples (prefill and decode)."""
    from engine.params import SamplingParams
    from placement.calibrate import ProfileSample

    def prefill_seconds(result) -> float:
        return result.metrics["prefill_end"] - result.metrics["prefill_start"]

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    samples = []
    for solo_len, batch, length in probes:
        solo = await client.agenerate(prompt(solo_len), one)
        samples.append(ProfileSample("prefill", 1, 1, (solo_len,), prefill_seconds(solo)))
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
    await asyncio.wait_for(prefill.pause.remote(True), _CALL_TIMEOUT_S)
    try:
        pending = [asyncio.ensure_future(client.agenerate(p, params)) for p in prompts]
        deadline = asyncio.get_running_loop().time() + _CALL_TIMEOUT_S
        while (await asyncio.wait_for(prefill.stats.remote(), _CALL_TIMEOUT_S))["waiting"] < len(prompts):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"probe batch of {len(prompts)} did not reach the prefill queue "
                                   f"within {_CALL_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(prefill.pause.remote(False), _CALL_TIMEOUT_S)
    return await asyncio.gather(*pending)


def profile_served(spec, repeats: int = 2, seed: int = 0, probes=PROBES, tokens: int = PROBE_TOKENS):
    """Launch ``single_pair(spec)`` on the connected Ray cluster, probe it ``repeats`` times, shut
    it down, and return the fitted CalibratedProfile. ValueError if too few clean samples."""
    from cluster.deployment import model_directory
    from cluster.launcher import Cluster
    from engine.config import load_config
    from engine.engine import context_limit
    from placement.calibrate import fit_profile

    pair = single_pair(spec)
    model_dir = model_directory(pair)
    config = load_config(model_dir)
    shapes = fit_probe_shapes(probes, tokens, context_limit(config, None))
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, config.vocab_size) for _ in range(n)]

    cluster = Cluster.from_spec(pair)
    try:
        client = cluster.client(timeout_s=600)
        prefill = next(h for name, h in cluster.actors.items() if "-prefill-" in name)

        async def run() -> list:
            samples = []
            for _ in range(repeats):
                samples += await probe(client, prefill, prompt, shapes, tokens)
            return samples

        samples = asyncio.run(run())
    finally:
        cluster.shutdown()
    return fit_profile(samples, model=spec.model.name or spec.model.path or "",
                       hardware=f"{spec.decode.device} served instance, num_cpus {spec.decode.num_cpus}",
                       dtype=spec.model.dtype)
