"""The Python client handle: talks to a running cluster's router. Every wait is bounded.

A request lives at most ``Client(timeout_s)`` or the spec's ``router.request_timeout_s``, whichever
ends first: the router then aborts it everywhere (its blocks freed) and the calls below raise
``RequestTimeout`` naming the limit (``generate_batch`` returns it as an error completion instead,
so one slow request does not cost the others' results).
"""
from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence

import ray

from tandem.cluster.stream_hub import POLL_S, StreamHub
from tandem.engine.outputs import Completion
from tandem.engine.params import SamplingParams
from tandem.transfer.protocol import StreamChunk, is_timeout, remote_cause

GRACE_S = 30.0  # beyond a request's limit, how long to wait for the router to say it timed out


class RequestTimeout(TimeoutError):
    """The cluster did not finish a request in time (it has been aborted and its blocks freed)."""


class RouterLost(RuntimeError):
    """The cluster's router died during a call. Ray restarts it; requests that were in flight are
    lost (the restarted router has every instance drop them, freeing their blocks): submit again."""


class Client:
    """``generate`` / ``stream`` / ``generate_batch`` (sync) and ``agenerate`` / ``astream`` (asyncio)."""

    def __init__(self, router, timeout_s: float = 600.0) -> None:
        self.router = router
        self.timeout_s = timeout_s
        self._hubs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> StreamHub

    # -- sync -----------------------------------------------------------------------------------

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        return self._get(self.router.submit.remote(prompt, params, request_id, self.timeout_s), 60.0)

    def generate(self, prompt, params: SamplingParams | None = None) -> Completion:
        return self.result(self.submit(prompt, params))

    def result(self, request_id: str) -> Completion:
        """The finished request; raises RequestTimeout if it timed out."""
        return _raise_if_timed_out(self._get(self.router.result.remote(request_id, self.timeout_s),
                                             self.timeout_s + GRACE_S))

    def generate_batch(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None
                       ) -> list[Completion]:
        """Submit all, then collect in order (a timed-out request comes back with finish_reason
        "error" and the timeout's message). If the router rejects one prompt, the ones already
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
        return self._get(refs, self.timeout_s + GRACE_S)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yields chunks of new tokens until the request finishes (the last chunk has metrics);
        raises RequestTimeout after the last chunk of a request that timed out."""
        rid = self.submit(prompt, params)
        deadline = time.monotonic() + self.timeout_s + GRACE_S
        try:
            while True:
                chunk = self._get(self.router.poll.remote(rid, POLL_S), POLL_S + GRACE_S)
                if chunk.token_ids or chunk.finished:
                    yield chunk
                if chunk.finished:
                    _raise_if_timed_out(chunk)
                    return
                if time.monotonic() > deadline:
                    raise RequestTimeout(f"request {rid!r}: the router did not finish it within "
                                         f"Client(timeout_s={self.timeout_s:g}) + {GRACE_S:g}s")
        except BaseException:
            self.abort(rid)  # a consumer that stops early must not leave the request running
            raise

    def abort(self, request_id: str) -> bool:
        return self._get(self.router.abort.remote(request_id), 30.0)

    def migrate(self, request_id: str, to: str | None = None, kind: str | None = None) -> str:
        """Move a request, live, to decode instance ``to`` (default: the one with the most free
        blocks); returns the destination. ``kind``: "copy" its KV or "recompute" it there (default:
        by ``migration.recompute_max_tokens``); one not prefilled yet (colocated) is re-dispatched.
        Raises MigrationError, the request going on where it was, if it cannot move (not on a
        decode instance, already moving, finished meanwhile)."""
        return self._get(self.router.migrate.remote(request_id, to, kind), 60.0)

    def drain(self, instance_id: str, timeout_s: float = 120.0) -> dict:
        """Empty decode instance ``instance_id``: no new requests go to it and its requests move,
        live, to the others. ``{"moved": n, "left": m}``; m > 0 if some were still there after
        ``timeout_s``."""
        return self._get(self.router.drain.remote(instance_id, timeout_s), timeout_s + GRACE_S)

    def limits(self) -> dict:
        """The longest request the cluster takes (``max_tokens``: prompt plus output)."""
        return self._get(self.router.limits.remote(), 60.0)

    def stats(self) -> dict:
        return self._get(self.router.stats.remote(), 60.0)

    @staticmethod
    def _get(ref, timeout_s: float):
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RequestTimeout(f"the router did not answer within {timeout_s:g}s") from None
        except ray.exceptions.RayError as exc:
            raise client_error(exc) from None

    # -- asyncio --------------------------------------------------------------------------------

    async def asubmit(self, prompt, params: SamplingParams | None = None) -> str:
        return await self._aget(self.router.submit.remote(prompt, params, None, self.timeout_s), 60.0)

    async def agenerate(self, prompt, params: SamplingParams | None = None) -> Completion:
        rid = await self.asubmit(prompt, params)
        return _raise_if_timed_out(await self._aget(self.router.result.remote(rid, self.timeout_s),
                                                    self.timeout_s + GRACE_S))

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        """Reply to a conversation (``{"role", "content"}`` messages), rendered with the model's
        chat template where the router runs (as ``LLM.chat`` and the HTTP front end do)."""
        return self.generate(self._get(self.router.chat_prompt.remote(messages), 60.0), params)

    async def atoken_texts(self, token_ids: list[int]) -> list[str]:
        """Each token id on its own as text, as the model's tokenizer decodes it."""
        return await self._aget(self.router.token_texts.remote(token_ids), 60.0) if token_ids else []

    async def achat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation as the router renders it (the model's chat template), token ids;
        ValueError if the template refuses it."""
        return await self._aget(self.router.chat_prompt.remote(messages), 60.0)

    async def astream_chat(self, messages: list[dict], params: SamplingParams | None = None
                           ) -> AsyncIterator[StreamChunk]:
        """``chat``, streamed as ``astream`` streams."""
        async for chunk in self.astream(await self.achat_prompt(messages), params):
            yield chunk

    async def astream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """As ``stream``; every astream of this client on one event loop shares one long poll."""
        hub = self._hub()
        rid = hub.new_request_id()
        queue = hub.open(rid)
        finished = False
        try:
            await self._aget(self.router.submit.remote(prompt, params, rid, self.timeout_s, hub.mailbox_id),
                             60.0)
            deadline = time.monotonic() + self.timeout_s + GRACE_S
            while not finished:
                chunk = await self._next_chunk(queue, rid, deadline)
                finished = chunk.finished
                yield chunk
            _raise_if_timed_out(chunk)
        except BaseException:
            if not finished:
                self.router.abort.remote(rid)  # a consumer that stops early must not leave it running
            raise
        finally:
            hub.close(rid)

    async def _next_chunk(self, queue: asyncio.Queue, rid: str, deadline: float) -> StreamChunk:
        try:
            item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"request {rid!r}: the router did not finish it within "
                                 f"Client(timeout_s={self.timeout_s:g}) + {GRACE_S:g}s") from None
        if isinstance(item, BaseException):
            raise client_error(item) from None
        return item

    def _hub(self) -> StreamHub:
        loop = asyncio.get_running_loop()
        hub = self._hubs.get(loop)
        if hub is None:
            hub = self._hubs[loop] = StreamHub(self.router, GRACE_S)
        return hub

    @staticmethod
    async def _aget(ref, timeout_s: float):
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the router did not answer within {timeout_s:g}s") from None
        except ray.exceptions.RayError as exc:
            raise client_error(exc) from None


def client_error(exc: BaseException) -> BaseException:
    """What a failed router call means to a caller: the router's own exception (a bad request,
    Overloaded, an unknown id), RouterLost when the router died, RequestTimeout when it did not
    answer."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return RouterLost(f"the cluster's router died during the call ({type(exc).__name__}); "
                          "requests in flight were lost and are dropped everywhere once it "
                          "restarts: submit again")
    if isinstance(exc, asyncio.TimeoutError):
        return RequestTimeout("the router did not answer a stream's poll in time")
    return remote_cause(exc)


def _raise_if_timed_out(finished):
    """Pass a finished Completion or StreamChunk through, or raise RequestTimeout for a timed-out one."""
    if finished.finish_reason == "error" and is_timeout(finished.error):
        raise RequestTimeout(finished.error)
    return finished
