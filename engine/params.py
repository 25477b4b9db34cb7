"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one request. ``temperature == 0`` means greedy.

    ``seed`` makes sampling reproducible: the same seed gives the same tokens whether the request
    runs alone or inside any batch. ``logprobs`` returns the model's (untempered) log-probability
    of each sampled token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        # Accept lists from callers while keeping the struct hashable and immutable.
        msgspec.structs.force_setattr(self, "stop", _strings("stop", self.stop))
        msgspec.structs.force_setattr(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        # torch generators take 64-bit seeds; a larger one would fail later, deep in the engine.
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _strings(field: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    items = tuple(value)
    if not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{field} must be non-empty strings, got {items!r}")
    return items
