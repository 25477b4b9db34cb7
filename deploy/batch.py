"""A batch job's engine room: prompts through a client with a bounded number in flight, each result
appended to the output JSONL the moment it finishes, progress as it goes, a summary at the end.

Resumable: ids already in the output are skipped, so a job killed midway and run again completes
only the missing ones (a last line the kill cut short is dropped first). Nothing waits on the
batch as a whole, so its size has no timeout: each request has the client's own.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple

import msgspec

PROGRESS_EVERY_S = 10.0  # a progress line this often when stderr is not a terminal (a job's log)


class Row(NamedTuple):
    id: str
    prompt: Any
    params: Any


def done_ids(out: Path) -> set[str]:
    """Ids the output already holds. A last line without its newline (the job was killed while
    writing it) is cut off, so that request runs again and the file stays valid JSONL."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    return {json.loads(line)["id"] for line in data[:end].decode().splitlines() if line.strip()}


class Tally:
    """Counts and latencies of the finished requests, for the progress lines and the summary."""

    def __init__(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped
        self.done = self.errors = self.tokens = 0
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.start = time.monotonic()

    def add(self, record: dict) -> None:
        self.done += 1
        if record.get("error"):
            self.errors += 1
        self.tokens += len(record.get("token_ids") or ())
        metrics = record.get("metrics") or {}
        if "ttft" in metrics:
            self.ttft.append(metrics["ttft"])
        if metrics.get("tpot"):
            self.tpot.append(metrics["tpot"])

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        return (f"{self.skipped + self.done}/{self.total} done ({self.skipped} from an earlier run), "
                f"{self.errors} errors, {self.tokens / max(elapsed, 1e-9):.1f} output tokens/s")

    def summary(self) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.done} completions in {elapsed:.1f} s ({self.skipped} skipped, already written)",
                 f"{self.errors} errors", f"{self.tokens} output tokens, {self.tokens / max(elapsed, 1e-9):.1f}/s"]
        for name, values in (("TTFT", self.ttft), ("TPOT", self.tpot)):
            if values:
                parts.append(f"{name} p50/p90/p99 " + "/".join(f"{1000 * _pct(values, q):.0f}"
                                                                for q in (50, 90, 99)) + " ms")
        return "; ".join(parts)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Progress:
    """A tqdm bar on a terminal; otherwise a line every ``every_s`` seconds (and one at the end)."""

    def __init__(self, tally: Tally, stream=None, every_s: float | None = None) -> None:
        self.tally = tally
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=tally.total, initial=tally.skipped, unit="req", file=self.stream)
        self.next_line = time.monotonic() + self.every_s

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(errors=self.tally.errors)
        elif time.monotonic() >= self.next_line:
            print(f"progress: {self.tally.line()}", file=self.stream, flush=True)
            self.next_line = time.monotonic() + self.every_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"progress: {self.tally.line()}", file=self.stream, flush=True)


async def run_batch(generate: Callable[[Any, Any], Awaitable[Any]], rows: list[Row], out: Path,
                    max_in_flight: int, progress_stream=None) -> Tally:
    """Run every row not in ``out`` yet through ``generate(prompt, params)`` (a Completion, or an
    exception: recorded as that row's error), at most ``max_in_flight`` at once, appending each
    result to ``out`` as it finishes."""
    seen = done_ids(out)
    todo = [row for row in rows if row.id not in seen]
    tally = Tally(len(rows), len(rows) - len(todo))
    progress = Progress(tally, progress_stream)
    queue = iter(todo)
    with out.open("a") as sink:
        async def worker() -> None:
            for row in queue:  # one shared iterator: each row is taken by exactly one worker
                record = await _record(generate, row)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                tally.add(record)
                progress.update()

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, min(max_in_flight, len(todo))))))
        finally:
            progress.close()
    return tally


async def _record(generate, row: Row) -> dict:
    try:
        result = await generate(row.prompt, row.params)
    except Exception as exc:  # this request failed; the batch goes on
        return {"id": row.id, "error": f"{type(exc).__name__}: {exc}", "finish_reason": "error"}
    return {**msgspec.to_builtins(result), "id": row.id}
