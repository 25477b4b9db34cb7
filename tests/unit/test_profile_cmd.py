"""`tandem profile` times the real engine and writes a calibration the planner can load."""
from __future__ import annotations

import textwrap

from tandem.deploy.cli import main
from tandem.placement.calibrate import load_profile
from tandem.deploy.cmd_profile import DECODE_GRID, PREFILL_GRID


def test_profile_writes_a_loadable_calibration(tiny_llama_dir, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: prof
        model: {{path: {tiny_llama_dir}, dtype: float32}}
        prefill: {{replicas: 1}}
        decode: {{replicas: 1}}
        """))
    out = tmp_path / "cal.json"
    assert main(["profile", str(spec), "--out", str(out), "--repeats", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    entry = load_profile(out).entry(1, 1)
    assert entry.prefill.samples == len(PREFILL_GRID) and entry.decode.samples == len(DECODE_GRID)
    # A fitted step time is positive and grows with the work (more prompt tokens, bigger batch).
    assert 0 < entry.prefill.at(32, 32**2) < entry.prefill.at(2048, 2048 * 512)
    assert 0 < entry.decode.at(1, 64)
