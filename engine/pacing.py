"""Paced steps: every model step lasts at least the time a latency model gives its batch.

Why: the simulator (placement/) is checked against the real cluster in the test suite, on a shared
host whose speed drifts by tens of percent within minutes. With steps paced to known forms, the
real cluster's router, step loops, KV transfers and policies all run for real while the model's
own cost is the same run to run, so a mismatch between simulation and cluster is the simulator's.
Also a way to rehearse a deployment at a slower device's speed on a fast one.

The forms are those of placement/calibrate.py (DistServe's), in seconds:
    prefill step = a + b * sum(prompt lengths) + c * sum(prompt lengths ** 2)
    decode step  = a + b * batch size          + c * sum(context lengths)
A mixed step (chunked prefill) adds both variable parts under the larger intercept: its one-token
queries are decodes, each chunk of n tokens after p cached ones costs the prefill's b * n +
c * n * (2p + n) (a whole prompt, p = 0, is the prefill form; 2p + n counts the cached prefix every
query reads).
A step whose model work takes longer than its pace is not slowed further.
"""
from __future__ import annotations

import time

import msgspec

from tandem.engine.scheduler import StepPlan


class StepPace(msgspec.Struct, frozen=True):
    """(a, b, c) per phase, seconds, in the forms above."""

    prefill: tuple[float, float, float]
    decode: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name, coef in (("prefill", self.prefill), ("decode", self.decode)):
            if len(coef) != 3 or any(c < 0 for c in coef):
                raise ValueError(f"step pace {name} needs three coefficients >= 0, got {coef}")

    def seconds(self, plan: StepPlan) -> float:
        if plan.kind == "mixed":
            return self.mixed_seconds(plan.chunks)
        lengths = [s.num_tokens for s in plan.seqs]
        if plan.kind == "prefill":
            return self.of_sums(len(lengths), sum(lengths), sum(n * n for n in lengths), 0, 0)
        return self.of_sums(0, 0, 0, len(lengths), sum(lengths))

    def mixed_seconds(self, chunks) -> float:
        """A chunked-prefill step of (cached tokens, new tokens) per sequence."""
        decodes = [start + 1 for start, n in chunks if n == 1]
        prompts = [(start, n) for start, n in chunks if n != 1]
        return self.of_sums(len(prompts), sum(n for _, n in prompts),
                            sum(n * (2 * start + n) for start, n in prompts), len(decodes), sum(decodes))

    def of_sums(self, prompts: int, tokens: int, attention: float, decodes: int, context: int) -> float:
        """The forms above from a step's sums (what the simulator keeps): prompt chunks, their
        tokens and attention term, decodes and their context tokens."""
        (ap, bp, cp), (ad, bd, cd) = self.prefill, self.decode
        fixed = max(ap if prompts else 0.0, ad if decodes else 0.0)
        return fixed + bp * tokens + cp * attention + bd * decodes + cd * context


class PacedRunner:
    """Wraps a ModelRunner's ``run``: runs the step, then sleeps out the rest of its pace. The
    engine steps through it and keeps the inner runner for everything else."""

    def __init__(self, runner, pace: StepPace) -> None:
        self.inner = runner
        self.pace = pace

    def run(self, plan: StepPlan):
        deadline = time.perf_counter() + self.pace.seconds(plan)
        logits = self.inner.run(plan)
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return logits
