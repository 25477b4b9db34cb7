"""Calibration: least-squares fits of measured step times, the profile file, and its use."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tandem.placement.calibrate import (CalibratedLatency, ProfileSample, fit_profile, least_squares,
                                        load_profile, nonnegative_least_squares, save_profile)
from tandem.placement.candidates import Shape
from tandem.placement.evaluate import Evaluator
from tandem.placement.latency import AnalyticLatency
from tandem.placement.problem import problem_from_dict


def _samples(tp: int, pp: int, noise: float = 0.0, seed: int = 0) -> list[ProfileSample]:
    """Step times from known coefficients: prefill 5 ms + 20 us/token + 2 ns/token^2,
    decode 8 ms + 50 us/sequence + 1.5 us/context token."""
    rng = random.Random(seed)
    out = []
    for _ in range(12):
        lengths = tuple(rng.randint(16, 1024) for _ in range(rng.randint(1, 6)))
        t = 0.005 + 20e-6 * sum(lengths) + 2e-9 * sum(x * x for x in lengths)
        out.append(ProfileSample("prefill", tp, pp, lengths, t * (1 + rng.gauss(0, noise))))
        ctx = tuple(rng.randint(16, 2048) for _ in range(rng.randint(1, 64)))
        t = 0.008 + 50e-6 * len(ctx) + 1.5e-6 * sum(ctx)
        out.append(ProfileSample("decode", tp, pp, ctx, t * (1 + rng.gauss(0, noise))))
    return out


def test_fit_recovers_known_coefficients() -> None:
    profile = fit_profile(_samples(1, 1) + _samples(2, 1, seed=1), model="opt-13b")
    assert [(e.tp, e.pp) for e in profile.entries] == [(1, 1), (2, 1)]
    entry = profile.entry(2, 1)
    assert entry is not None and entry.prefill is not None and entry.decode is not None
    assert entry.prefill.coef == pytest.approx((0.005, 20e-6, 2e-9), rel=1e-6)
    assert entry.decode.coef == pytest.approx((0.008, 50e-6, 1.5e-6), rel=1e-6)
    assert entry.prefill.rms < 1e-12 and entry.decode.samples == 12
    assert profile.entry(4, 1) is None


def test_fit_with_noise_stays_close() -> None:
    entry = fit_profile(_samples(1, 1, noise=0.01)).entries[0]
    assert entry.decode is not None
    assert entry.decode.at(32, 32 * 1000) == pytest.approx(0.008 + 50e-6 * 32 + 1.5e-6 * 32000, rel=0.03)


def _concave_prefill_samples() -> list[ProfileSample]:
    """Times that flatten with length (noise or a cache effect): plain least squares answers with
    a negative quadratic coefficient."""
    rng = random.Random(3)
    out = []
    for _ in range(10):
        lengths = tuple(rng.randint(32, 512) for _ in range(rng.randint(1, 8)))
        t = 0.01 + 30e-6 * sum(lengths) - 4e-9 * sum(x * x for x in lengths)
        out.append(ProfileSample("prefill", 1, 1, lengths, t))
    return out


def test_fit_keeps_every_cost_term_nonnegative_and_optimal() -> None:
    samples = _concave_prefill_samples()
    plain = [(1.0, float(sum(s.lengths)), float(sum(x * x for x in s.lengths))) for s in samples]
    assert min(least_squares(plain, [s.seconds for s in samples])) < 0  # the constraint matters
    coef = fit_profile(samples + _samples(1, 1)[1::2]).entries[0].prefill.coef
    assert min(coef) >= 0
    # The fit minimises relative error: each row and time divided by the time.
    rows = [[f / s.seconds for f in row] for row, s in zip(plain, samples)]
    targets = [1.0] * len(samples)
    # Optimality (KKT): the residual's gradient is ~0 along free coefficients and >= 0 along
    # coefficients held at zero, i.e. no feasible direction lowers the squared error.
    residual = [sum(c * f for c, f in zip(coef, r)) - t for r, t in zip(rows, targets)]
    for j in range(3):
        grad = sum(r[j] * e for r, e in zip(rows, residual))
        scale = sum(abs(r[j] * t) for r, t in zip(rows, targets))
        assert (grad >= -1e-9 * scale) if coef[j] == 0 else abs(grad) <= 1e-6 * scale


def test_fit_recovers_true_times_better_than_an_absolute_fit_under_multiplicative_noise() -> None:
    """Host drift scales a sample's time by a random factor, so its noise grows with the time:
    minimising relative error is then the maximum-likelihood fit. Over many noisy probe sets (the
    served probes' shapes), the fit must predict the noise-free single-prompt times better than the
    same non-negative fit of absolute error."""
    shapes = [(1, 256), (16, 64), (1, 224), (4, 240), (1, 192), (1, 160), (1, 128), (12, 160)]

    def true_time(n: int, length: int) -> float:
        return 0.04 + 0.0022 * n * length + 2e-7 * n * length * length

    def features(n: int, length: int) -> tuple[float, float, float]:
        return 1.0, float(n * length), float(n * length * length)

    ours, absolute = [], []
    for seed in range(40):
        rng = random.Random(seed)
        samples = [ProfileSample("prefill", 1, 1, (length,) * n, true_time(n, length) * (1 + rng.gauss(0, 0.1)))
                   for n, length in shapes * 2]
        fit = fit_profile(samples + _samples(1, 1)[1::2]).entries[0].prefill
        plain = nonnegative_least_squares([features(len(s.lengths), s.lengths[0]) for s in samples],
                                          [s.seconds for s in samples])
        for length in (128, 160, 192, 224, 256):
            truth = true_time(1, length)
            ours.append(abs(fit.at(*features(1, length)[1:]) / truth - 1))
            absolute.append(abs(sum(c * f for c, f in zip(plain, features(1, length))) / truth - 1))
    assert sum(ours) < 0.9 * sum(absolute)


def test_nonnegative_fit_equals_plain_fit_when_that_is_nonnegative() -> None:
    rows = [(1.0, x, x * x) for x in (1.0, 2.0, 3.0, 5.0)]
    targets = [2 + 3 * x + 0.5 * x * x for x, _, _ in [(r[1], 0, 0) for r in rows]]
    assert nonnegative_least_squares(rows, targets) == pytest.approx([2, 3, 0.5], rel=1e-9)


def test_least_squares_matches_exact_solution_on_a_line() -> None:
    rows = [(1.0, float(x)) for x in range(10)]
    assert least_squares(rows, [3 + 2 * x for x in range(10)]) == pytest.approx([3, 2])
    assert least_squares([(1.0, 1.0), (1.0, 1.0)], [1.0, 2.0]) is None  # singular


def test_fit_errors_explain_what_is_missing() -> None:
    with pytest.raises(ValueError, match="at least 3 samples"):
        fit_profile(_samples(1, 1)[:4])
    same = [ProfileSample("decode", 1, 1, (100,), 0.01)] * 5
    with pytest.raises(ValueError, match="do not vary enough"):
        fit_profile(same)
    with pytest.raises(ValueError, match="seconds > 0"):
        fit_profile([ProfileSample("decode", 1, 1, (100,), 0.0)])
    with pytest.raises(ValueError, match="no samples"):
        fit_profile([])


def test_router_samples_give_the_median_delay_and_are_not_a_phase() -> None:
    router = [ProfileSample("router", 1, 1, (n,), d) for n, d in ((64, 0.004), (256, 0.009), (128, 0.005))]
    profile = fit_profile(_samples(1, 1) + router)
    assert profile.router_delay_s == pytest.approx(0.005)
    assert [(e.tp, e.pp) for e in profile.entries] == [(1, 1)]
    assert profile.entries == fit_profile(_samples(1, 1)).entries  # the fits do not see them
    assert fit_profile(_samples(1, 1)).router_delay_s is None  # a bare-engine profile has none


def test_router_delay_lowers_a_tight_ttft_goodput(tmp_path: Path) -> None:
    # A 600 ms router delay against a 500 ms TTFT target: no rate meets the SLO any more.
    router = [ProfileSample("router", 1, 1, (256,), 0.6)] * 3
    save_profile(fit_profile(_samples(1, 1) + router), tmp_path / "slow.json")
    save_profile(fit_profile(_samples(1, 1)), tmp_path / "fast.json")
    fast = Evaluator(_spec(str(tmp_path / "fast.json"))).phase_goodput("prefill", Shape(1, 1), False)
    slow = Evaluator(_spec(str(tmp_path / "slow.json"))).phase_goodput("prefill", Shape(1, 1), False)
    assert fast.rate > 0 and slow.rate == 0


def test_profile_file_round_trip(tmp_path: Path) -> None:
    router = [ProfileSample("router", 1, 1, (100,), 0.003)]
    profile = fit_profile(_samples(1, 1) + router, model="opt-13b", hardware="A100-80GB", dtype="fp16")
    path = tmp_path / "profile.json"
    save_profile(profile, path)
    assert load_profile(path) == profile
    (tmp_path / "bad.json").write_text('{"entries": 3}')
    with pytest.raises(ValueError, match="not a calibration profile"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
    negative = json.loads(path.read_text()) | {"router_delay_s": -0.001}
    (tmp_path / "negative.json").write_text(json.dumps(negative))
    with pytest.raises(ValueError, match="router_delay_s"):
        load_profile(tmp_path / "negative.json")


def test_calibrated_latency_uses_fit_and_falls_back() -> None:
    only_decode = [s for s in _samples(1, 2) if s.phase == "decode"]
    entry = fit_profile(only_decode).entries[0]
    spec = _spec()
    fallback = AnalyticLatency(spec.model, spec.hardware, spec.dtype, 1, 2)
    lat = CalibratedLatency(entry, fallback)
    assert lat.decode(10, 5000) == pytest.approx(0.008 + 50e-6 * 10 + 1.5e-6 * 5000)
    assert lat.prefill(2, 600, 180000) == fallback.prefill(2, 600, 180000)


def _spec(calibration: str | None = None):  # type: ignore[no-untyped-def]
    data = {"model": "opt-13b", "hardware": "A100-80GB", "cluster": {"nodes": 1, "devices_per_node": 2},
            "slo": {"ttft_ms": 500, "tpot_ms": 100},
            "workload": {"input_len": 256, "output_len": 32}}
    if calibration:
        data["calibration"] = calibration
    return problem_from_dict(data)


def test_planner_reads_the_calibration_file(tmp_path: Path) -> None:
    # A profile saying tp=1 prefill is 10x slower than the analytic model must lower its goodput.
    analytic = _spec()
    slow = AnalyticLatency(analytic.model, analytic.hardware, analytic.dtype, 1, 1)
    samples = []
    for n in range(1, 7):
        lengths = tuple([128 * n] * n)
        t = 10 * slow.prefill(len(lengths), sum(lengths), sum(x * x for x in lengths))[0]
        samples.append(ProfileSample("prefill", 1, 1, lengths, t))
    save_profile(fit_profile(samples), tmp_path / "p.json")
    calibrated = _spec(str(tmp_path / "p.json"))
    assert calibrated.calibration is not None
    fast = Evaluator(analytic).phase_goodput("prefill", Shape(1, 1), False).rate
    slowed = Evaluator(calibrated).phase_goodput("prefill", Shape(1, 1), False).rate
    assert 0 < slowed < fast / 5
