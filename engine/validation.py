"""Request validation shared by the engine and the router (which rejects bad requests before any
instance sees them)."""
from __future__ import annotations

from tandem.engine.params import SamplingParams


def validate_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int,
                     max_model_len: int, capacity_tokens: int, has_tokenizer: bool) -> None:
    """Raise ValueError naming the problem if the request can never run."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    total = len(prompt_ids) + params.max_tokens
    what = f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total}"
    if total > max_model_len:
        raise ValueError(f"{what} exceeds the model's context length {max_model_len}")
    if total > capacity_tokens:
        raise ValueError(f"{what} exceeds the KV cache capacity of {capacity_tokens} tokens")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this model directory has none")
