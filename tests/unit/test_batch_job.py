"""deploy/batch.py: a bounded number of requests in flight, each result appended as it finishes,
resumable by id (a torn last line dropped), per-request errors recorded, a summary. The client is a
stand-in here; tests/integration/test_job_submit.py runs the job against a real cluster."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from tandem.deploy.batch import Row, done_ids, run_batch
from tandem.engine.outputs import Completion


class FakeClient:
    """Completes each prompt after a short wait; records the most requests it had at once and
    how many lines the output held whenever a request started."""

    def __init__(self, out: Path, fail: set[str] = frozenset()) -> None:
        self.out, self.fail = out, fail
        self.in_flight = self.most = 0
        self.lines_seen: list[int] = []
        self.started: list[str] = []

    async def generate(self, prompt, params) -> Completion:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.started.append(prompt)
        self.lines_seen.append(len(self.out.read_text().splitlines()) if self.out.exists() else 0)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        if prompt in self.fail:
            raise ValueError(f"prompt {prompt!r} is bad")
        return Completion(request_id=f"r-{prompt}", token_ids=[1, 2, 3], text="abc", finish_reason="length",
                          metrics={"ttft": 0.01, "tpot": 0.002})


def _rows(count: int) -> list[Row]:
    return [Row(f"id-{i}", f"p{i}", None) for i in range(count)]


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_results_stream_to_the_file_with_a_bounded_number_in_flight(tmp_path):
    out = tmp_path / "out.jsonl"
    client = FakeClient(out, fail={"p7"})
    tally = asyncio.run(run_batch(client.generate, _rows(500), out, 16, io.StringIO()))
    assert client.most == 16
    # The file grew while the job ran: the last requests started with most results already written.
    assert client.lines_seen[-1] >= 500 - 2 * 16
    records = _read(out)
    assert sorted(r["id"] for r in records) == sorted(f"id-{i}" for i in range(500))
    (bad,) = [r for r in records if r.get("error")]
    assert bad["id"] == "id-7" and "ValueError: prompt 'p7' is bad" in bad["error"]
    assert (tally.done, tally.errors, tally.tokens) == (500, 1, 3 * 499)
    summary = tally.summary()
    assert "500 completions" in summary and "1 errors" in summary and "TTFT p50/p90/p99 10/10/10 ms" in summary


def test_a_rerun_completes_only_the_missing_ids_after_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    first = [json.dumps({"id": f"id-{i}", "token_ids": [1]}) for i in range(200)]
    out.write_text("\n".join(first) + '\n{"id": "id-200", "tok')  # killed while writing line 201
    assert done_ids(out) == {f"id-{i}" for i in range(200)}
    assert out.read_text().endswith("}\n")  # the torn line is gone
    client = FakeClient(out)
    tally = asyncio.run(run_batch(client.generate, _rows(500), out, 8, io.StringIO()))
    assert sorted(client.started) == sorted(f"p{i}" for i in range(200, 500))
    assert (tally.skipped, tally.done) == (200, 300)
    ids = [r["id"] for r in _read(out)]
    assert len(ids) == len(set(ids)) == 500


def test_progress_lines_go_to_a_log(tmp_path):
    out = tmp_path / "out.jsonl"
    log = io.StringIO()
    from tandem.deploy import batch

    original = batch.PROGRESS_EVERY_S
    batch.PROGRESS_EVERY_S = 0.0
    try:
        asyncio.run(run_batch(FakeClient(out).generate, _rows(5), out, 2, log))
    finally:
        batch.PROGRESS_EVERY_S = original
    lines = log.getvalue().splitlines()
    assert lines and lines[-1].startswith("progress: 5/5 done (0 from an earlier run), 0 errors")


def test_a_job_file_with_a_repeated_id_is_refused(tmp_path):
    from tandem.deploy.job import read_prompts

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n')
    with pytest.raises(SystemExit, match=r"in.jsonl:3: id 'a' repeats line 1"):
        read_prompts(path)


def test_a_terminal_gets_a_progress_bar(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, screen = tmp_path / "out.jsonl", Terminal()
    asyncio.run(run_batch(FakeClient(out).generate, _rows(5), out, 2, screen))
    assert "5/5" in screen.getvalue() and "req" in screen.getvalue()
    assert "progress:" not in screen.getvalue()
