"""Log-probabilities in OpenAI's two shapes, from a stream chunk's tokens.

Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}``;
chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}]}``. Token texts come from the router (the ingress holds no tokenizer): each token
decoded on its own, as OpenAI labels them.
"""
from __future__ import annotations

from typing import Any

from tandem.transfer.protocol import StreamChunk


def ids_to_label(chunk: StreamChunk) -> list[int]:
    """Every token id a chunk's logprobs name: its tokens and their most likely alternatives."""
    ids = set(chunk.token_ids)
    for top in chunk.top_logprobs or ():
        ids.update(t.token_id for t in top)
    return sorted(ids)


def completion_logprobs(chunk: StreamChunk, texts: dict[int, str], offset: int) -> dict[str, Any]:
    """A completions choice's ``logprobs`` for ``chunk``'s tokens; ``offset``: characters of the
    completion before them."""
    tokens = [texts[t] for t in chunk.token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = None
    if chunk.top_logprobs is not None:
        tops = [_by_text(top, texts) for top in chunk.top_logprobs]
    return {"tokens": tokens, "token_logprobs": list(chunk.logprobs or ()), "top_logprobs": tops,
            "text_offset": offsets}


def _by_text(top, texts: dict[int, str]) -> dict[str, float]:
    """OpenAI's ``{text: logprob}``. Two tokens may decode to the same text (say, two halves of
    UTF-8 characters, each shown as U+FFFD): the more likely one keeps the key."""
    out: dict[str, float] = {}
    for t in top:
        out.setdefault(texts[t.token_id], t.logprob)
    return out


def chat_logprobs(chunk: StreamChunk, texts: dict[int, str]) -> dict[str, Any]:
    """A chat choice's ``logprobs`` for ``chunk``'s tokens."""
    tops = chunk.top_logprobs or [[] for _ in chunk.token_ids]
    return {"content": [
        {**_entry(texts[token], logprob), "top_logprobs": [_entry(texts[t.token_id], t.logprob) for t in top]}
        for token, logprob, top in zip(chunk.token_ids, chunk.logprobs or (), tops)]}


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def merged(chunks: list[StreamChunk]) -> StreamChunk:
    """One chunk holding all of ``chunks``' tokens and logprobs (a non-streaming response)."""
    last = chunks[-1]
    tops = None if last.top_logprobs is None and chunks[0].top_logprobs is None else \
        [top for c in chunks for top in (c.top_logprobs or ())]
    return StreamChunk(last.request_id, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                       last.finish_reason, last.error, last.metrics,
                       logprobs=[lp for c in chunks for lp in (c.logprobs or ())], top_logprobs=tops)
