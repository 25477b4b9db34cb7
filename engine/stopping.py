"""Stop conditions: EOS / stop token ids, max_tokens, context length, and stop strings."""
from __future__ import annotations

from tandem.engine.sequence import Sequence


def finish_reason(seq: Sequence, token: int, eos_ids: tuple[int, ...], max_model_len: int) -> str | None:
    """Why the request ends after `token`, or None to go on."""
    params = seq.params
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        return "stop"
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def append_text(seq: Sequence, new_text: str, final: bool = False) -> tuple[str, bool]:
    """Append detokenized text; cut it before the first stop string, if one completed.

    Returns the text to emit now and whether a stop string ended the request. With stop strings,
    the last ``len(longest) - 1`` characters are held back until the request finishes (`final`, or
    a stop string completes): they may still turn out to begin a stop string, and a client that
    concatenates deltas must never see part of one. What was emitted before is therefore always
    ``seq.text[:len(seq.text) - hold]``, so no extra state is needed (nor handed to another engine
    with the request). Only the tail that could contain a new match is searched, so the cost per
    token stays constant.
    """
    hold = max(len(s) for s in seq.params.stop) - 1 if seq.params.stop else 0
    emitted = max(0, len(seq.text) - hold)
    seq.text += new_text
    stopped = False
    if new_text and seq.params.stop:
        hits = [i for i in (seq.text.find(s, emitted) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
            stopped = True
    end = len(seq.text) if final or stopped else max(emitted, len(seq.text) - hold)
    return seq.text[emitted:end], stopped
