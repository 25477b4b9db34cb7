"""The engine's hand-over API types: a request leaving one engine and joining another.

A prefill instance hands each prefilled request to a decode instance with it, and decode instances
migrate running requests between them:

    export(request_id) -> Export      source: stop scheduling the request, keep its blocks
    snapshot(request_id, first_block) source: a running request's full blocks, kept alive until
                                      unshare(block_ids), for a migration's pre-copy stages
    reserve(request_id, num_tokens)   destination: blocks for its KV (None: no room, nothing held)
    extend(request_id, num_tokens)    destination: grow a reservation (None: no room)
    admit(state)                      destination: the caller filled the reserved blocks; join the batch
    release(request_id)               either side: free an export's or a reservation's blocks
    resume(request_id)                source: an export that went nowhere rejoins the batch here
    withdraw(request_id) -> state     source: a request still waiting for its prefill leaves
    recompute(state)                  destination: a request without KV waits for a prefill over
                                      its prompt and output so far (moving costs compute, no copy)

plus ``Engine.kv_cache``, the tensor a transport reads the exported blocks from and writes the
reserved ones into. ``RequestState`` is everything but the KV that a request needs to continue
elsewhere; it crosses actors inside the protocol messages (``tandem.transfer.protocol``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from tandem.engine.outputs import TokenDelta, TopLogprob
from tandem.engine.params import SamplingParams

if TYPE_CHECKING:  # light at run time: the protocol module, and so every client, imports this one
    import torch

    from tandem.engine.engine import EngineConfig


class RequestState(msgspec.Struct, frozen=True):
    """Everything but the KV that a request needs to continue decoding elsewhere."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    rng_state: bytes | None  # torch.Generator state: sampling continues the same stream
    prefix_offset: int
    read_offset: int
    text: str
    logprobs: list[float]
    num_preemptions: int = 0
    top_logprobs: list[list[TopLogprob]] = []

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV travels with the request: all but the newest sampled token, which the
        destination's first step computes."""
        return len(self.token_ids) - 1


class Export(msgspec.Struct, frozen=True):
    """A request detached from scheduling, its blocks kept until ``release``."""

    state: RequestState
    block_ids: list[int]  # in the request's token order

    @property
    def num_kv_tokens(self) -> int:
        return self.state.num_kv_tokens


class Snapshot(msgspec.Struct, frozen=True):
    """Full KV blocks of a running request, each with an extra reference (``Engine.snapshot``)."""

    block_ids: list[int]
    num_kv_tokens: int  # tokens of KV in the request's blocks up to the last of these


class HandoverEngine(Protocol):
    """What the instances may use of an ``Engine``: the step API and the hand-over API."""

    config: EngineConfig
    num_preemptions: int

    @property
    def kv_cache(self) -> torch.Tensor: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_scheduled(self) -> int: ...

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> str: ...
    def step(self) -> list[TokenDelta]: ...
    def abort(self, request_id: str) -> TokenDelta | None: ...
    def has_unfinished(self) -> bool: ...
    def request_ids(self) -> list[str]: ...
    def stats(self) -> dict[str, int]: ...
    def export(self, request_id: str) -> Export: ...
    def snapshot(self, request_id: str, first_block: int) -> Snapshot: ...
    def unshare(self, block_ids: list[int]) -> None: ...
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None: ...
    def extend(self, request_id: str, num_tokens: int) -> list[int] | None: ...
    def admit(self, state: RequestState) -> None: ...
    def release(self, request_id: str) -> None: ...
    def resume(self, request_id: str) -> None: ...
    def withdraw(self, request_id: str) -> RequestState: ...
    def recompute(self, state: RequestState) -> None: ...

