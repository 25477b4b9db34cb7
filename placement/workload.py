"""Workload description and seeded request generation.

A workload is sampled once per seed at unit rate; a simulation at rate R divides the arrival times
by R. Every probe of a goodput search therefore sees the same requests in the same order, only
compressed in time (common random numbers), which keeps attainment smooth in R and keeps the
binary search monotone in the SLO.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Annotated, Literal, Union

import msgspec

Pos = Annotated[int, msgspec.Meta(ge=1)]


class Fixed(msgspec.Struct, frozen=True, tag="fixed", tag_field="dist", forbid_unknown_fields=True):
    """Every request has the same length."""

    value: Pos


class Uniform(msgspec.Struct, frozen=True, tag="uniform", tag_field="dist", forbid_unknown_fields=True):
    """Integer lengths uniform in [low, high]."""

    low: Pos
    high: Pos


class LogNormal(msgspec.Struct, frozen=True, tag="lognormal", tag_field="dist",
                forbid_unknown_fields=True):
    """Lognormal lengths with arithmetic ``mean`` and log-space ``sigma``, clipped to [min, max]."""

    mean: Annotated[float, msgspec.Meta(gt=0)]
    sigma: Annotated[float, msgspec.Meta(ge=0)]
    min: Pos = 1
    max: Pos | None = None


LengthDist = Union[Fixed, Uniform, LogNormal]


class Arrival(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Poisson, or Gamma inter-arrivals with coefficient of variation ``cv`` (cv > 1 is bursty)."""

    process: Literal["poisson", "gamma"] = "poisson"
    cv: Annotated[float, msgspec.Meta(gt=0)] = 1.0


class Workload(msgspec.Struct, frozen=True):
    """Arrivals plus request lengths, either from distributions or from a trace's (in, out) pairs."""

    arrival: Arrival
    rate: float | None  # target traffic in requests/s; None: use the whole cluster
    input_len: LengthDist | None = None
    output_len: LengthDist | None = None
    trace: tuple[tuple[int, int], ...] = ()
    trace_path: str | None = None

    def max_lengths(self, max_positions: int) -> tuple[int, int]:
        """Largest (input, output) the workload can produce, after clipping to the context."""
        if self.trace:
            max_in = max(i for i, _ in self.trace)
            max_out = max(o for _, o in self.trace)
        else:
            assert self.input_len is not None and self.output_len is not None
            max_in = _dist_max(self.input_len, max_positions)
            max_out = _dist_max(self.output_len, max_positions)
        max_in = min(max_in, max_positions - 1)
        return max_in, max(1, min(max_out, max_positions - max_in))


def _dist_max(dist: LengthDist, max_positions: int) -> int:
    if isinstance(dist, Fixed):
        return dist.value
    if isinstance(dist, Uniform):
        return dist.high
    return dist.max if dist.max is not None else max_positions


def _sample_length(dist: LengthDist, rng: random.Random, cap: int) -> int:
    if isinstance(dist, Fixed):
        value = dist.value
    elif isinstance(dist, Uniform):
        value = rng.randint(dist.low, dist.high)
    else:
        mu = math.log(dist.mean) - dist.sigma**2 / 2  # so that E[X] = mean before clipping
        value = int(round(rng.lognormvariate(mu, dist.sigma)))
        value = max(dist.min, min(value, dist.max if dist.max is not None else cap))
    return max(1, min(value, cap))


class BaseTrace(msgspec.Struct, frozen=True):
    """Requests at unit rate: cumulative arrival times (mean gap 1 s) and lengths."""

    times: tuple[float, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.times)

    def arrivals(self, rate: float) -> list[float]:
        scale = 1.0 / rate
        return [t * scale for t in self.times]


def sample_base(workload: Workload, count: int, seed: int, max_positions: int) -> BaseTrace:
    """Draw ``count`` requests; output lengths are cut so that input + output fits the context."""
    rng = random.Random(seed)
    gaps_rng = random.Random(seed * 7919 + 1)  # lengths stay the same when the arrival model changes
    inputs, outputs = [], []
    for _ in range(count):
        if workload.trace:
            inp, out = workload.trace[rng.randrange(len(workload.trace))]
            inp = min(inp, max_positions - 1)
        else:
            assert workload.input_len is not None and workload.output_len is not None
            inp = _sample_length(workload.input_len, rng, max_positions - 1)
            out = _sample_length(workload.output_len, rng, max_positions)
        inputs.append(inp)
        outputs.append(max(1, min(out, max_positions - inp)))
    times, now = [], 0.0
    cv = workload.arrival.cv if workload.arrival.process == "gamma" else 1.0
    shape = 1.0 / (cv * cv)
    for _ in range(count):
        now += gaps_rng.expovariate(1.0) if cv == 1.0 else gaps_rng.gammavariate(shape, 1.0 / shape)
        times.append(now)
    return BaseTrace(times=tuple(times), inputs=tuple(inputs), outputs=tuple(outputs))


def load_trace(path: Path) -> tuple[tuple[int, int], ...]:
    """Read a JSONL trace of {"input_len": .., "output_len": ..}; ValueError names the bad line."""
    pairs = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            inp, out = row["input_len"], row["output_len"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected {{\"input_len\": int, \"output_len\": int}}") from None
        if not (isinstance(inp, int) and isinstance(out, int) and inp >= 1 and out >= 1):
            raise ValueError(f"{path}:{number}: input_len and output_len must be integers >= 1")
        pairs.append((inp, out))
    if not pairs:
        raise ValueError(f"{path}: trace is empty")
    return tuple(pairs)
