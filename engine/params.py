"""Per-request sampling parameters, validated strictly on construction (and on every decode).

The schema is declared once, as annotated fields, and checked with msgspec's strict conversion:
exact types (an int is not a bool, a float or a digit string), ranges, non-empty stop strings.
A bad value raises ValueError naming the field, at the boundary, never later inside a step.
"""
from __future__ import annotations

import math
import re
from typing import Annotated

import msgspec

MAX_TOP_LOGPROBS = 20  # the most likely tokens a request may ask to see at each step
INT32_MAX = 2**31 - 1  # counts and ids: far beyond any vocabulary or context, and a tensor fits them
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's rule): 1/T would overflow

PositiveCount = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]


class _Schema(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: PositiveCount = 16
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_k: Count = 0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: tuple[Annotated[str, msgspec.Meta(min_length=1)], ...] = ()
    stop_token_ids: tuple[Count, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0


class SamplingParams(_Schema, frozen=True, kw_only=True):
    """How to sample one request. ``temperature`` below ``GREEDY_BELOW`` (0 included) means greedy.

    ``seed`` makes sampling reproducible: the same seed gives the same tokens whether the request
    runs alone or inside any batch. ``logprobs`` returns the model's (untempered) log-probability
    of each sampled token, and ``top_logprobs`` (up to 20; it needs ``logprobs``) that many of the
    most likely tokens at each step with theirs. ``stop`` takes one string or a sequence of them; ``top_k`` 0 disables
    top-k (and must not exceed the model's vocabulary).
    """

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            msgspec.structs.force_setattr(self, "stop", (self.stop,))
        try:
            checked = msgspec.convert(msgspec.structs.asdict(self), _Schema, strict=True)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid SamplingParams: {_named(exc)}") from None
        # Lists become tuples, keeping the struct hashable and immutable.
        msgspec.structs.force_setattr(self, "stop", checked.stop)
        msgspec.structs.force_setattr(self, "stop_token_ids", checked.stop_token_ids)
        if not math.isfinite(self.temperature):
            raise ValueError("invalid SamplingParams: temperature: must be finite, "
                             f"got {self.temperature!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("invalid SamplingParams: top_logprobs: needs logprobs=True, got "
                             f"top_logprobs={self.top_logprobs} with logprobs=False")
        # torch generators take 64-bit seeds; a larger one would fail later, deep in the engine.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError("invalid SamplingParams: seed: must be in [-2**63, 2**64) or None, "
                             f"got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _named(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `bool` - at `$.max_tokens`" as "max_tokens: expected ..."."""
    text = str(exc)
    match = re.fullmatch(r"(.*) - at `\$\.([^`]+)`", text)
    return f"{match[2]}: {match[1][0].lower()}{match[1][1:]}" if match else text
