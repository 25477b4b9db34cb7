"""The protocol: every message that crosses an actor boundary, in one module every side imports.

Plain frozen msgspec structs, no tensors: the KV itself moves through a transport. Types the engine
owns travel inside these messages and are re-exported here so that callers import one module:
``RequestState`` (engine/handover.py), ``TokenDelta`` and ``SamplingParams``.

    router -> prefill   submit(request id, prompt ids, SamplingParams)
    prefill -> router   on_prefilled([PrefillResult])          first token, RequestState, KVHandle
    router -> decode    admit(RequestState, KVHandle)          pull the KV, then join the batch
    decode -> router    on_decode_step(StepReport)             one message per step, every delta
    router -> prefill   ack([request id])                      the decode side has the KV: free it
    router -> decode    precopy / receive_stage / export(first_block) / admit: live migration
                                                               (cluster/migration.py)
    router -> client    StreamChunk                            what a request made since the last read
"""
from __future__ import annotations

from typing import Any

import msgspec

from tandem.engine.handover import RequestState
from tandem.engine.outputs import TokenDelta, TopLogprob
from tandem.engine.params import SamplingParams

__all__ = ["KVHandle", "KVLayout", "PrefillResult", "RequestState", "SamplingParams", "StepReport",
           "StreamChunk", "TokenDelta", "TopLogprob", "is_timeout", "remote_cause", "timeout_error"]

_TIMED_OUT = " timed out: "
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "uint8": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1}


class KVLayout(msgspec.Struct, frozen=True):
    """Shape of one KV block: the unit transports move. ``dtype`` is a torch dtype name."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Per-block slice of the cache ``[L, 2, blocks, block_size, Hkv, D]`` (blocks axis = 2)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (0 for a dtype this module does not know the size of)."""
        size = 1
        for n in self.block_shape:
            size *= n
        return size * _DTYPE_BYTES.get(self.dtype, 0)


class KVHandle(msgspec.Struct, frozen=True):
    """A request's exported KV: what a destination needs to fetch it.

    ``payload`` is transport-specific (an object-store reference, a shared-memory name, ...);
    it never carries the tensor bytes inline through the control plane.
    """

    transport: str
    request_id: str
    num_tokens: int  # tokens of KV the request has once these blocks are in place
    num_blocks: int
    layout: KVLayout
    payload: Any = None
    node_id: str = ""
    first_block: int = 0  # where the blocks go in the request's table (a migration's later stages)


class PrefillResult(msgspec.Struct, frozen=True):
    """A prefilled request: its first token and, unless it already finished, its state and KV."""

    delta: TokenDelta
    state: RequestState | None
    handle: KVHandle | None
    prefill_start: float
    prefill_end: float


class StepReport(msgspec.Struct, frozen=True):
    """One message per decode step: every running request's new tokens plus admission outcomes."""

    deltas: list[TokenDelta]
    admitted: list[str]
    failed: list[tuple[str, str]]  # (request id, error)
    free_blocks: int
    preemptions: int = 0  # requests the instance has preempted since it started
    started: float = 0.0  # wall-clock time the step began: when the admitted requests joined
    num_requests: int = 0  # requests it holds after the step (running or waiting)


class StreamChunk(msgspec.Struct, frozen=True):
    """Everything a request produced since the client's previous read."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None
    metrics: dict[str, float] | None = None
    logprobs: list[float] | None = None  # of these tokens, when the request asked
    top_logprobs: list[list[TopLogprob]] | None = None
    token_gaps: list[float] | None = None  # the last chunk: seconds between consecutive tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class HealthReport(msgspec.Struct, frozen=True):
    """An instance's answer to the router's health check, given beside its step loop."""

    incarnation: str  # new each time the actor's process starts: a change means it was restarted
    failure: str | None = None  # why its step loop stopped ("Type: message"), if it did


class Overloaded(RuntimeError):
    """The cluster refused a new request: it has as many in flight as its limit allows. Nothing was
    started; retrying later may succeed (an HTTP front end answers 429)."""


def timeout_error(request_id: str, limit: str) -> str:
    """The error of a request aborted for running past ``limit`` (which names the setting)."""
    return f"request {request_id!r}{_TIMED_OUT}it ran past {limit}; aborted, its blocks freed"


def is_timeout(error: str | None) -> bool:
    """Whether a finished request's error is ``timeout_error``'s (clients raise RequestTimeout)."""
    return error is not None and error.startswith("request ") and _TIMED_OUT in error


def remote_cause(exc: BaseException) -> BaseException:
    """The exception a remote call raised on the other side: Ray wraps it (``RayTaskError.cause``);
    anything else is its own cause. Needs no Ray import."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
