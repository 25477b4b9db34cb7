"""An OpenAI-compatible HTTP front end for a running cluster (FastAPI on uvicorn).

    POST /v1/completions, /v1/chat/completions   streaming (server-sent events) or not
    GET  /v1/models, /health, /metrics (Prometheus: deploy/openai_metrics.py; no key needed)

Each request is one router request through a ``Client``: every stream of this process shares the
client's one long poll (cluster/stream_hub.py), so the ingress makes one router call per poll
round, not one per token or per stream. A client that disconnects has its request aborted (its
blocks freed). Errors use OpenAI's shape and status codes: a bad field 400 naming it, an unknown
model 404, a missing or wrong API key 401, an overloaded cluster 429, a lost router 503.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

import msgspec

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tandem.cluster.client import Client, RequestTimeout, RouterLost
from tandem.deploy.openai_logprobs import chat_logprobs, completion_logprobs, ids_to_label, merged
from tandem.deploy.openai_metrics import Metrics
from tandem.deploy.openai_requests import OpenAIError, Parsed, parse_chat, parse_completion
from tandem.transfer.protocol import Overloaded, StreamChunk, remote_cause

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class Served:
    """What the front end serves: the cluster's client, the names its model answers to, and the
    longest request the cluster takes (prompt plus output)."""

    def __init__(self, client: Client, names: list[str], max_len: int, api_key: str | None = None) -> None:
        self.client, self.names, self.max_len, self.api_key = client, names, max_len, api_key
        self.created = int(time.time())
        self.metrics = Metrics(client.stats)

    def check_model(self, model: str) -> None:
        if model not in self.names:
            raise OpenAIError(404, f"model: {model!r} is not served here (this server has: "
                                   f"{', '.join(self.names)})", "model", code="model_not_found")

    async def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The messages rendered by the router with the model's chat template, as token ids."""
        try:
            return await self.client.achat_prompt(messages)
        except ValueError as exc:
            raise OpenAIError(400, f"messages: {remote_cause(exc)}", "messages") from None


def build_app(served: Served) -> FastAPI:
    """The ASGI application."""
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def body_of(request: Request) -> Any:
        if served.api_key is not None and request.headers.get("authorization") != f"Bearer {served.api_key}":
            raise OpenAIError(401, "a valid API key is required (Authorization: Bearer ...)",
                              kind="authentication_error", code="invalid_api_key")
        try:
            return await request.json()
        except ValueError:
            raise OpenAIError(400, "the request body is not valid JSON") from None

    async def respond(request: Request, parsed: Parsed, kind: str):
        served.check_model(parsed.model)
        chunks = _chunks(served.client, parsed)
        first = await _first_chunk(chunks)  # errors before any output become HTTP errors
        if parsed.stream:
            events = _events(first, chunks, parsed, kind, served)
            return StreamingResponse(events, media_type="text/event-stream")
        task = asyncio.ensure_future(_collect(first, chunks))
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # the stream's consumer goes away: the request is aborted
                await asyncio.gather(task, return_exceptions=True)
                return JSONResponse({}, status_code=499)
        return JSONResponse(await _whole(task.result(), parsed, kind, served))

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await body_of(request))
        return await respond(request, parsed, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        parsed = parse_chat(body, default_max_tokens=1)
        served.check_model(parsed.model)
        prompt, params = await served.chat_prompt(parsed.prompt), parsed.params
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            room = served.max_len - len(prompt)  # as OpenAI: up to the context's end
            if room < 1:
                raise OpenAIError(400, f"messages: the conversation is {len(prompt)} tokens, "
                                       f"the model's limit {served.max_len}", "messages")
            params = msgspec.structs.replace(params, max_tokens=room)
        parsed = Parsed(parsed.model, prompt, params, parsed.stream, parsed.include_usage)
        return await respond(request, parsed, "chat.completion")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": served.created,
                                            "owned_by": "tandem"} for name in served.names]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(await asyncio.to_thread(served.metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    return app


async def _chunks(client: Client, parsed: Parsed) -> AsyncIterator[StreamChunk]:
    try:
        async for chunk in client.astream(parsed.prompt, parsed.params):
            yield chunk
    except (ValueError, TypeError) as exc:
        raise OpenAIError(400, str(exc), _param_of(str(exc))) from None
    except Overloaded as exc:
        raise OpenAIError(429, str(exc), kind="rate_limit_error", code="overloaded") from None
    except RouterLost as exc:
        raise OpenAIError(503, str(exc), kind="service_unavailable") from None
    except RequestTimeout as exc:
        raise OpenAIError(504, str(exc), kind="timeout") from None


async def _first_chunk(chunks: AsyncIterator[StreamChunk]) -> StreamChunk:
    return await chunks.__anext__()


async def _collect(first: StreamChunk, chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    collected = [first]
    if not first.finished:
        async for chunk in chunks:
            collected.append(chunk)
    return collected


def _usage(last: StreamChunk, num_tokens: int) -> dict[str, int]:
    prompt = int((last.metrics or {}).get("num_prompt_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": num_tokens, "total_tokens": prompt + num_tokens}


def _finish(chunk: StreamChunk) -> str | None:
    if chunk.finish_reason is None:
        return None
    return "length" if chunk.finish_reason == "length" else "stop"


async def _whole(chunks: list[StreamChunk], parsed: Parsed, kind: str, served: Served) -> dict:
    last = chunks[-1]
    served.metrics.observe(last.metrics, last.finish_reason, last.token_gaps)
    if last.error is not None:
        raise OpenAIError(500, last.error, kind="server_error")
    whole = merged(chunks)
    choice: dict[str, Any] = {"index": 0, "logprobs": await _logprobs(served, parsed, kind, whole, 0),
                              "finish_reason": _finish(last)}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": whole.text}
    else:
        choice["text"] = whole.text
    return {"id": _id(kind, last.request_id), "object": kind, "created": int(time.time()),
            "model": parsed.model, "choices": [choice], "usage": _usage(last, len(whole.token_ids))}


async def _logprobs(served: Served, parsed: Parsed, kind: str, chunk: StreamChunk, offset: int) -> dict | None:
    """The choice's ``logprobs`` for ``chunk``'s tokens in the endpoint's shape, or None if the
    request did not ask."""
    if not parsed.params.logprobs:
        return None
    ids = ids_to_label(chunk)
    texts = dict(zip(ids, await served.client.atoken_texts(ids)))
    if kind == "chat.completion":
        return chat_logprobs(chunk, texts)
    return completion_logprobs(chunk, texts, offset)


async def _events(first: StreamChunk, chunks: AsyncIterator[StreamChunk], parsed: Parsed, kind: str,
                  served: Served) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per router chunk, the usage chunk if asked, then [DONE]."""
    chat = kind == "chat.completion"
    object_ = "chat.completion.chunk" if chat else "text_completion"
    rid, created, num_tokens, offset = _id(kind, first.request_id), int(time.time()), 0, 0

    def event(choices: list, **extra) -> bytes:
        body = {"id": rid, "object": object_, "created": created, "model": parsed.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    chunk, stream = first, _prepend(first, chunks)
    try:
        async for chunk in stream:
            if chunk.finished:
                served.metrics.observe(chunk.metrics, chunk.finish_reason, chunk.token_gaps)
            if chunk.error is not None:
                error = OpenAIError(500, chunk.error, kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n".encode()
                break
            num_tokens += len(chunk.token_ids)
            if chunk.text or chunk.finished or (parsed.params.logprobs and chunk.token_ids):
                if chat:
                    content = {"delta": {"content": chunk.text} if chunk.text else {}}
                else:
                    content = {"text": chunk.text}
                logprobs = await _logprobs(served, parsed, kind, chunk, offset)
                offset += sum(len(t) for t in (logprobs or {}).get("tokens", ()))
                yield event([{"index": 0, **content, "logprobs": logprobs, "finish_reason": _finish(chunk)}])
    except OpenAIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n".encode()
    if parsed.include_usage:
        yield event([], usage=_usage(chunk, num_tokens))
    yield b"data: [DONE]\n\n"


async def _prepend(first: StreamChunk, rest: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    yield first
    if not first.finished:
        async for chunk in rest:
            yield chunk


def _id(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{request_id or uuid.uuid4().hex}"


def _param_of(message: str) -> str | None:
    """The field a validation message starts with (``max_tokens: ...``), if any."""
    head = message.removeprefix("invalid SamplingParams: ").split(":", 1)[0]
    return head if head.isidentifier() else None


def http_server(served: Served, host: str, port: int):
    """A uvicorn server for ``build_app(served)`` (``.run()`` serves until stopped)."""
    import uvicorn

    config = uvicorn.Config(build_app(served), host=host, port=port, log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def parse_address(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1 (this machine only)."""
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http: expected [HOST:]PORT, got {value!r}")
    return host or "127.0.0.1", int(port)
