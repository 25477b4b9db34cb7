"""`tandem bench`'s load generator: timed requests against any OpenAI-compatible server (its base
URL, ending in /v1, as OpenAI clients take it).

Each request is a streamed ``/v1/completions`` call whose prompt is token ids (so its length is
exact on any server that takes them, as tandem and vLLM do) with ``max_tokens`` and
``ignore_eos``, sent at its arrival time whether or not earlier ones have finished (an open loop:
a slow server faces the offered load, not a throttled one). Everything is timed here, on the
client: when the request was sent, when each chunk with new text arrived, when it ended.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import msgspec

REQUEST_TIMEOUT_S = 600.0


class Timing(msgspec.Struct):
    """One request as the client saw it; times in seconds from the start of its rate's run."""

    index: int
    scheduled: float  # its arrival time
    input_len: int
    output_len: int  # asked for
    sent: float = 0.0
    token_times: list[float] = msgspec.field(default_factory=list)  # each chunk with text
    end: float = 0.0
    output_tokens: int = 0  # as the server's usage reports them
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times and not self.error else None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None for one-token answers)."""
        if self.error or not self.token_times or self.output_tokens < 2:
            return None
        return (self.end - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def prompt_ids(length: int, rng: random.Random, token_range: tuple[int, int]) -> list[int]:
    return [rng.randrange(*token_range) for _ in range(length)]


async def run_rate(url: str, model: str, arrivals: list[float], inputs: list[int], outputs: list[int],
                   token_range: tuple[int, int], api_key: str | None = None, seed: int = 0) -> list[Timing]:
    """Send request ``i`` at ``arrivals[i]`` seconds, with ``inputs[i]`` prompt tokens and
    ``outputs[i]`` output tokens; every request's timing, in order."""
    import httpx

    rng = random.Random(seed)
    prompts = [prompt_ids(n, rng, token_range) for n in inputs]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as http:
        start = time.perf_counter()
        timings = [Timing(i, t, n, o) for i, (t, n, o) in enumerate(zip(arrivals, inputs, outputs))]
        await asyncio.gather(*(_one(http, model, prompts[t.index], t, start) for t in timings))
    return timings


async def _one(http, model: str, prompt: list[int], timing: Timing, start: float) -> None:
    delay = timing.scheduled - (time.perf_counter() - start)
    if delay > 0:
        await asyncio.sleep(delay)
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": timing.output_len,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    timing.sent = time.perf_counter() - start
    try:
        async with http.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                timing.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                _take(line, timing, time.perf_counter() - start)
    except Exception as exc:  # a dropped connection, a timeout: this request failed, the run goes on
        timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        timing.end = time.perf_counter() - start
    if timing.error is None and not timing.token_times:
        timing.error = "the stream ended without any output"


def _take(line: str, timing: Timing, now: float) -> None:
    """One server-sent-events line: a chunk with text is a token arrival; the usage chunk counts."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[len("data: "):])
    if "error" in event:
        timing.error = str(event["error"].get("message", event["error"]))
        return
    if event.get("usage"):
        timing.output_tokens = int(event["usage"].get("completion_tokens", 0))
    for choice in event.get("choices") or ():
        if choice.get("text"):
            timing.token_times.append(now)
