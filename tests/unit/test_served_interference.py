"""The served profile's interference arithmetic: A/B medians to slowdowns, and the decode length of
the probe batch (the probes themselves run in tests/integration/test_served_profile.py)."""
from __future__ import annotations

import pytest

from tandem.cluster.served_profile import (InterferenceSample, fit_interference, fit_interference_shape,
                                   interference_tokens)
from tandem.placement.calibrate import CalibratedEntry, CalibratedProfile, PhaseFit


def test_slowdowns_are_medians_of_per_pass_ratios() -> None:
    passes = [InterferenceSample((0.20, 0.21), (0.26, 0.25, 9.0), tpot_alone=0.10, tpot_beside=0.11),
              InterferenceSample((0.19,), (0.24,), tpot_alone=0.10, tpot_beside=0.13),
              # the host twice as slow in this pass: its ratio counts, not its absolute times
              InterferenceSample((0.40, 0.42), (0.60,), tpot_alone=0.20, tpot_beside=0.30)]
    slow = fit_interference(passes)
    # prefill per pass: 0.26 / 0.205 = 1.268, 0.24 / 0.19 = 1.263, 0.60 / 0.41 = 1.463
    assert slow.prefill == pytest.approx(0.26 / 0.205 - 1)
    assert slow.decode == pytest.approx(1.3 - 1)  # median of 1.1, 1.3, 1.5


def test_a_pass_without_prefills_beside_decode_is_skipped() -> None:
    passes = [InterferenceSample((0.2,), (), tpot_alone=0.1, tpot_beside=0.1),
              InterferenceSample((0.2,), (0.3,), tpot_alone=0.1, tpot_beside=0.1)]
    assert fit_interference(passes).prefill == pytest.approx(0.5)


def test_a_speedup_is_noise_and_clips_to_zero() -> None:
    slow = fit_interference([InterferenceSample((0.2,), (0.19,), tpot_alone=0.1, tpot_beside=0.09)])
    assert (slow.prefill, slow.decode) == (0.0, 0.0)


def test_no_prefill_beside_decode_is_an_error_that_says_why() -> None:
    with pytest.raises(ValueError, match="no prefill ran beside a decoding batch"):
        fit_interference([InterferenceSample((0.2,), (), tpot_alone=0.1, tpot_beside=0.1)])


def _profile(prefill_s: float, step_s: float) -> CalibratedProfile:
    return CalibratedProfile(entries=(CalibratedEntry(
        1, 1, prefill=PhaseFit((prefill_s, 0.0, 0.0), 0.0, 3), decode=PhaseFit((step_s, 0.0, 0.0), 0.0, 3)),))


def test_probe_batch_decodes_long_enough_for_the_prefills_beside_it() -> None:
    # 8 prefills of 0.3 s beside 0.05 s steps: 48 tokens; never under 32; capped by the room.
    assert interference_tokens(_profile(0.3, 0.05), (8, 96, 192)) == 48
    assert interference_tokens(_profile(0.01, 0.05), (8, 96, 192)) == 32
    assert interference_tokens(_profile(0.3, 0.05), (8, 96, 192), limit=120) == 120 - 96 - 1


def test_probe_batch_leaves_room_for_each_prefills_round_trip() -> None:
    # A lone request's 0.5 s end to end (router hops, reply) beyond its 0.3 s step: 80 tokens; a
    # round trip shorter than the fitted step changes nothing.
    assert interference_tokens(_profile(0.3, 0.05), (8, 96, 192), request_s=0.5) == 80
    assert interference_tokens(_profile(0.3, 0.05), (8, 96, 192), request_s=0.1) == 48


def test_probe_shape_shrinks_to_small_contexts() -> None:
    assert fit_interference_shape((8, 96, 192), 4096) == (8, 96, 192)
    assert fit_interference_shape((8, 96, 192), 128) == (8, 64, 126)
