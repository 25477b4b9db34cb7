"""The Python client handle: talks to a running cluster's router. Every wait is bounded."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import ray

from tandem.transfer.protocol import StreamChunk
from tandem.engine.outputs import Completion
from tandem.engine.params import SamplingParams

POLL_S = 10.0  # one poll waits at most this long on the router for new tokens


class RequestTimeout(TimeoutError):
    """The cluster did not finish a request in time (it has been aborted)."""


class Client:
    """``generate`` / ``stream`` / ``generate_batch`` (sync) and ``agenerate`` / ``astream`` (asyncio)."""

    def __init__(self, router, timeout_s: float = 600.0) -> None:
        self.router = router
        self.timeout_s = timeout_s

    # -- sync -----------------------------------------------------------------------------------

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        return self._get(self.router.submit.remote(prompt, params, request_id), 60.0)

    def generate(self, prompt, params: SamplingParams | None = None) -> Completion:
        return self.result(self.submit(prompt, params))

    def result(self, request_id: str) -> Completion:
        return self._get(self.router.result.remote(request_id, self.timeout_s), self.timeout_s + 30)

    def generate_batch(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None
                       ) -> list[Completion]:
        """Submit all, then collect in order. If the router rejects one prompt, the ones already
        submitted are aborted and the error is raised."""
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.submit(prompt, p))
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        refs = [self.router.result.remote(rid, self.timeout_s) for rid in ids]
        return self._get(refs, self.timeout_s + 30)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yields chunks of new tokens until the request finishes (the last chunk has metrics)."""
        rid = self.submit(prompt, params)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                chunk = self._get(self.router.poll.remote(rid, POLL_S), POLL_S + 30)
                if chunk.token_ids or chunk.finished:
                    yield chunk
                if chunk.finished:
                    return
                if time.monotonic() > deadline:
                    raise RequestTimeout(f"request {rid} did not finish in {self.timeout_s}s")
        except BaseException:
            self.abort(rid)  # a consumer that stops early must not leave the request running
            raise

    def abort(self, request_id: str) -> bool:
        return self._get(self.router.abort.remote(request_id), 30.0)

    def stats(self) -> dict:
        return self._get(self.router.stats.remote(), 60.0)

    @staticmethod
    def _get(ref, timeout_s: float):
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None

    # -- asyncio --------------------------------------------------------------------------------

    async def asubmit(self, prompt, params: SamplingParams | None = None) -> str:
        return await self._aget(self.router.submit.remote(prompt, params), 60.0)

    async def agenerate(self, prompt, params: SamplingParams | None = None) -> Completion:
        rid = await self.asubmit(prompt, params)
        return await self._aget(self.router.result.remote(rid, self.timeout_s), self.timeout_s + 30)

    async def astream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        rid = await self.asubmit(prompt, params)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                chunk = await self._aget(self.router.poll.remote(rid, POLL_S), POLL_S + 30)
                if chunk.token_ids or chunk.finished:
                    yield chunk
                if chunk.finished:
                    return
                if time.monotonic() > deadline:
                    raise RequestTimeout(f"request {rid} did not finish in {self.timeout_s}s")
        except BaseException:
            self.router.abort.remote(rid)
            raise

    @staticmethod
    async def _aget(ref, timeout_s: float):
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None
