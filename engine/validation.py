"""Request validation shared by the engine and the router (which rejects bad requests before any
instance sees them): strict prompt types, a size cap checked before tokenizing, and the limits
that depend on the model and the cache."""
from __future__ import annotations

import operator

from tandem.engine.params import SamplingParams

# No token of a real vocabulary spans more characters: text longer than this many per token of
# the context cannot fit, and is refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 64


def prompt_token_ids(prompt, tokenizer, max_model_len: int) -> list[int]:
    """The prompt's token ids: text through the tokenizer, or a list/tuple of integer ids (not
    bools, floats or strings). Raises TypeError/ValueError naming the problem."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json: pass token ids")
        cap = MAX_CHARS_PER_TOKEN * max_model_len
        if len(prompt) > cap:
            raise ValueError(f"prompt of {len(prompt)} characters cannot fit the model's context of "
                             f"{max_model_len} tokens (at most {cap} characters are tokenized)")
        return tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    return [_token_id(i, t) for i, t in enumerate(prompt)]


def _token_id(position: int, token) -> int:
    if isinstance(token, bool) or not hasattr(type(token), "__index__"):
        raise TypeError(f"prompt[{position}]: token ids must be integers, "
                        f"got {type(token).__name__} {token!r}")
    return operator.index(token)


def validate_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int,
                     max_model_len: int, capacity_tokens: int, has_tokenizer: bool) -> None:
    """Raise ValueError naming the problem if the request can never run."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if not prompt_ids:
        raise ValueError("prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if params.top_k > vocab_size:
        raise ValueError(f"top_k: {params.top_k} exceeds the vocabulary size {vocab_size}")
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    total = len(prompt_ids) + params.max_tokens
    what = f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total}"
    if total > max_model_len:
        raise ValueError(f"{what} exceeds the model's context length {max_model_len}")
    if total > capacity_tokens:
        raise ValueError(f"{what} exceeds the KV cache capacity of {capacity_tokens} tokens")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this model directory has none")
