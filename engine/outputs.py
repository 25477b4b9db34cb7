"""What an engine step reports, and a finished request's result. Plain msgspec structs so the same
objects cross actor boundaries unchanged."""
from __future__ import annotations

import msgspec


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One of the most likely tokens at a step, with the model's log-probability of it."""

    token_id: int
    logprob: float


class TokenDelta(msgspec.Struct, frozen=True):
    """New tokens (and the text they completed) of one request since the previous delta."""

    request_id: str
    token_ids: list[int]
    text: str
    index: int = 0  # output position of the first token: receivers order deltas by it
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # set on the request's last delta
    error: str | None = None
    top_logprobs: list[list[TopLogprob]] | None = None  # per token, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Completion(msgspec.Struct):
    """A finished request: ``finish_reason`` is one of "stop", "length", "abort" (or "error")."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    prompt_token_ids: list[int] | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    top_logprobs: list[list[TopLogprob]] | None = None  # per output token, most likely first
