"""`tandem profile` times the real engine and writes a calibration the planner can load."""
from __future__ import annotations

import textwrap

import pytest

from tandem.deploy.cli import main
from tandem.placement.calibrate import load_profile
from tandem.deploy.cmd_profile import DECODE_GRID, PREFILL_GRID


def _spec(tmp_path, model_dir, device: str = "cpu"):
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: prof
        model: {{path: {model_dir}, dtype: float32}}
        prefill: {{replicas: 1, device: {device}}}
        decode: {{replicas: 1, device: {device}}}
        """))
    return spec


def test_profile_writes_a_loadable_calibration(tiny_llama_dir, tmp_path, capsys):
    spec = _spec(tmp_path, tiny_llama_dir)
    out = tmp_path / "cal.json"
    assert main(["profile", str(spec), "--out", str(out), "--repeats", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    entry = load_profile(out).entry(1, 1)
    assert entry.prefill.samples == len(PREFILL_GRID) and entry.decode.samples == len(DECODE_GRID)
    # A fitted step time is positive and grows with the work (more prompt tokens, bigger batch).
    assert 0 < entry.prefill.at(32, 32**2) < entry.prefill.at(2048, 2048 * 512)
    assert 0 < entry.decode.at(1, 64)


def test_profile_times_each_parallel_shape_asked_for(tiny_llama_dir, tmp_path, capsys):
    spec = _spec(tmp_path, tiny_llama_dir)
    out = tmp_path / "cal.json"
    assert main(["profile", str(spec), "--out", str(out), "--repeats", "1", "--shapes", "1x1", "1x2"]) == 0
    assert "tp=1 pp=2: prefill rms" in capsys.readouterr().out
    profile = load_profile(out)
    assert {(e.tp, e.pp) for e in profile.entries} == {(1, 1), (1, 2)}
    entry = profile.entry(1, 2)
    assert entry.prefill.samples == len(PREFILL_GRID) and entry.decode.samples == len(DECODE_GRID)
    assert 0 < entry.decode.at(1, 64)
    assert main(["profile", str(spec), "--out", str(out), "--shapes", "2by1"]) != 0
    assert "--shapes: '2by1' is not TPxPP" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_of_a_cuda_spec_times_the_engine_on_its_gpu(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert main(["profile", str(_spec(tmp_path, tiny_llama_dir, "cuda")), "--out", str(out), "--repeats", "1"]) == 0
    profile = load_profile(out)
    assert profile.hardware.startswith("cuda ") and 0 < profile.entry(1, 1).decode.at(1, 64)
