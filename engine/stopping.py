"""Stop conditions: EOS / stop token ids, max_tokens, context length, and stop strings."""
from __future__ import annotations

from engine.sequence import Sequence


def finish_reason(seq: Sequence, token: int, eos_ids: tuple[int, ...], max_model_len: int) -> str | None:
    """Why the request ends after `token`, or None to go on."""
    params = seq.params
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        return "stop"
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def append_text(seq: Sequence, new_text: str) -> tuple[str, bool]:
    """Append detokenized text; cut it before the first stop string, if one completed.

    Returns the text actually added and whether a stop string ended the request. Only the tail that
    could contain a new match is searched, so the cost per token stays constant.
    """
    if not new_text:
        return "", False
    before = len(seq.text)
    seq.text += new_text
    if not seq.params.stop:
        return new_text, False
    longest = max(len(s) for s in seq.params.stop)
    search_from = max(0, before - longest + 1)
    hits = [i for i in (seq.text.find(s, search_from) for s in seq.params.stop) if i >= 0]
    if not hits:
        return new_text, False
    cut = min(hits)
    seq.text = seq.text[:cut]
    return seq.text[before:], True
