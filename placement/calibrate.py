"""Calibrated latency: least-squares fits (of relative error) of measured step times, stored as a
JSON profile.

Per instance shape (tp, pp) and phase we fit DistServe's functional forms:
    prefill latency = a + b * sum(prompt lengths) + c * sum(prompt lengths ** 2)
    decode step     = a + b * batch size       + c * sum(context lengths)
``tandem profile`` (wired elsewhere) times the real engine, calls ``fit_profile`` and ``save_profile``;
the planner loads the file with ``load_profile`` and uses a fit wherever one exists for the shape
being costed, falling back to the analytic model elsewhere.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Iterable, Literal, Sequence

import msgspec

from .latency import StepModel
from .sim_core import Interference

Phase = Literal["prefill", "decode", "router"]


class ProfileSample(msgspec.Struct, frozen=True):
    """One timed step: the batch's prompt (prefill) or context (decode) lengths and its seconds.
    A served profile's "router" samples are a lone request's time to first token outside its
    prefill step (``lengths``: its prompt's): dispatch, step-loop wake-up, the first token's report."""

    phase: Phase
    tp: int
    pp: int
    lengths: tuple[int, ...]
    seconds: float


class PhaseFit(msgspec.Struct, frozen=True):
    """Coefficients (a, b, c) of one phase's form, with the fit's RMS residual in seconds."""

    coef: tuple[float, float, float]
    rms: float
    samples: int

    def at(self, x1: float, x2: float) -> float:
        a, b, c = self.coef
        return max(1e-6, a + b * x1 + c * x2)  # a noisy fit may dip below zero at tiny batches


class CalibratedEntry(msgspec.Struct, frozen=True):
    """Fits for one instance shape; a phase never measured is None."""

    tp: int
    pp: int
    prefill: PhaseFit | None = None
    decode: PhaseFit | None = None


class CalibratedProfile(msgspec.Struct, frozen=True):
    """The calibration file: what was measured (model, hardware, dtype), the fits and, from a
    served profile, how much the two phases slow each other down on one node."""

    entries: tuple[CalibratedEntry, ...]
    model: str = ""
    hardware: str = ""
    dtype: str = ""
    version: int = 1
    interference: Interference | None = None
    # Served profiles: median "router" sample, the time to first token a request spends outside
    # the model steps even on idle instances. The simulator adds it to every TTFT.
    router_delay_s: Annotated[float, msgspec.Meta(ge=0)] | None = None

    def entry(self, tp: int, pp: int) -> CalibratedEntry | None:
        for e in self.entries:
            if e.tp == tp and e.pp == pp:
                return e
        return None


def _features(sample: ProfileSample) -> tuple[float, float, float]:
    if sample.phase == "prefill":
        return 1.0, float(sum(sample.lengths)), float(sum(x * x for x in sample.lengths))
    return 1.0, float(len(sample.lengths)), float(sum(sample.lengths))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is singular."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(matrix, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-10:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float] | None:
    """Ordinary least squares via normal equations on max-abs-scaled columns (for conditioning)."""
    k = len(rows[0])
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(k)]
    x = [[r[j] / scale[j] for j in range(k)] for r in rows]
    ata = [[sum(row[i] * row[j] for row in x) for j in range(k)] for i in range(k)]
    atb = [sum(row[i] * t for row, t in zip(x, targets)) for i in range(k)]
    solution = _solve(ata, atb)
    return None if solution is None else [s / scale[j] for j, s in enumerate(solution)]


def nonnegative_least_squares(rows: Sequence[Sequence[float]],
                              targets: Sequence[float]) -> list[float] | None:
    """Least squares with every coefficient >= 0, exactly: the best of the ordinary fits over each
    subset of the columns whose coefficients all come out >= 0 (3 columns: 7 subsets).

    Why: each term of the forms is a cost (fixed overhead, per token, per token pair), so a
    negative one only fits noise, and it extrapolates badly: a negative quadratic term made the
    simulator under-predict long prefill batches (benchmarks/RESULTS.md, "Simulator vs real")."""
    k = len(rows[0])
    best, best_err = None, float("inf")
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sub = least_squares([[r[j] for j in cols] for r in rows], targets)
        if sub is None or min(sub) < 0:
            continue
        coef = [0.0] * k
        for j, c in zip(cols, sub):
            coef[j] = c
        err = sum((t - sum(c * f for c, f in zip(coef, r))) ** 2 for r, t in zip(rows, targets))
        if err < best_err:
            best, best_err = coef, err
    return best


def _fit_phase(samples: list[ProfileSample], label: str) -> PhaseFit:
    if len(samples) < 3:
        raise ValueError(f"{label}: need at least 3 samples to fit 3 coefficients, got {len(samples)}")
    rows = [_features(s) for s in samples]
    targets = [s.seconds for s in samples]
    if least_squares(rows, targets) is None:
        raise ValueError(f"{label}: samples do not vary enough (vary batch sizes and lengths)")
    # Minimise relative error (each sample's row and time divided by its time): a plain fit lets
    # the longest samples decide, and a 2 s batch probe then outweighs the 0.4 s single prompts
    # a workload mostly runs; unstable intercepts of up to 0.15 s came from that on a noisy host.
    coef = nonnegative_least_squares([[f / t for f in row] for row, t in zip(rows, targets)],
                                     [1.0] * len(targets))
    assert coef is not None  # the constant column alone always fits positive times
    residuals = [t - sum(c * f for c, f in zip(coef, row)) for row, t in zip(rows, targets)]
    rms = (sum(r * r for r in residuals) / len(residuals)) ** 0.5
    return PhaseFit(coef=(coef[0], coef[1], coef[2]), rms=rms, samples=len(samples))


def fit_profile(samples: Iterable[ProfileSample], model: str = "", hardware: str = "",
                dtype: str = "") -> CalibratedProfile:
    """Fit every (tp, pp, phase) group in ``samples``; ValueError if a group cannot be fitted."""
    groups: dict[tuple[int, int, str], list[ProfileSample]] = {}
    router: list[float] = []
    for s in samples:
        if s.seconds <= 0 or not s.lengths or min(s.lengths) < 1:
            raise ValueError(f"invalid sample {s!r}: needs seconds > 0 and lengths >= 1")
        if s.phase == "router":
            router.append(s.seconds)
        else:
            groups.setdefault((s.tp, s.pp, s.phase), []).append(s)
    if not groups:
        raise ValueError("no samples to fit")
    entries = []
    for tp, pp in sorted({(tp, pp) for tp, pp, _ in groups}):
        fits = {phase: _fit_phase(groups[(tp, pp, phase)], f"{phase} tp={tp} pp={pp}")
                for phase in ("prefill", "decode") if (tp, pp, phase) in groups}
        entries.append(CalibratedEntry(tp=tp, pp=pp, prefill=fits.get("prefill"),
                                       decode=fits.get("decode")))
    return CalibratedProfile(entries=tuple(entries), model=model, hardware=hardware, dtype=dtype,
                             router_delay_s=statistics.median(router) if router else None)


def save_profile(profile: CalibratedProfile, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(profile), indent=2) + b"\n")


def load_profile(path: str | Path) -> CalibratedProfile:
    """Read a profile file; ValueError with the reason if it is missing or malformed."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=CalibratedProfile)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: not a calibration profile ({exc})") from None


class CalibratedLatency:
    """A StepModel from fitted coefficients, delegating unmeasured phases to ``fallback``."""

    def __init__(self, entry: CalibratedEntry, fallback: StepModel) -> None:
        self.entry = entry
        self.fallback = fallback

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        fit = self.entry.prefill
        if fit is None:
            return self.fallback.prefill(seqs, tokens, sum_sq)
        latency = fit.at(tokens, sum_sq)
        # A pipelined instance takes a new batch when its first stage is free (~1/pp of the trip).
        return latency, latency / self.entry.pp

    def decode(self, batch: int, sum_ctx: int) -> float:
        fit = self.entry.decode
        return self.fallback.decode(batch, sum_ctx) if fit is None else fit.at(batch, sum_ctx)

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        if self.entry.prefill is None or self.entry.decode is None:
            return self.fallback.mixed(seqs, tokens, sum_sq, batch, sum_ctx)
        if seqs == 0:
            return self.entry.decode.at(batch, sum_ctx)
        prefill = self.entry.prefill.at(tokens, sum_sq)
        if batch == 0:
            return prefill
        # One step pays the fixed per-step cost once, not once per phase.
        return prefill + self.entry.decode.at(batch, sum_ctx) - min(self.entry.decode.coef[0], prefill)
