"""Tokenizer (HF ``tokenizer.json`` through the `tokenizers` library) and incremental detokenizer.

Incremental detokenization decodes a small window of recent tokens and emits only the text that
became final: a multi-byte UTF-8 character split across tokens shows up as U+FFFD until its last
byte arrives, so the emitted text never contains a half character.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# How many already-emitted tokens to re-decode for context (leading-space and merge rules).
_CONTEXT_TOKENS = 6


class Tokenizer:
    def __init__(self, path: Path) -> None:
        self._tok = _HFTokenizer.from_file(str(path))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "Tokenizer | None":
        path = model_dir / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each id decoded on its own (how logprobs label tokens)."""
        return [self.decode([t]) for t in token_ids]


@dataclass
class DetokenizerState:
    """Window offsets into a sequence's token ids; two ints, so it travels in a ``RequestState``."""

    prefix_offset: int
    read_offset: int

    @classmethod
    def after_prompt(cls, num_prompt_tokens: int) -> "DetokenizerState":
        return cls(max(num_prompt_tokens - _CONTEXT_TOKENS, 0), num_prompt_tokens)


def detokenize_step(tokenizer: Tokenizer, token_ids: list[int], state: DetokenizerState) -> str:
    """Text that the newest tokens completed; advances `state` when text is emitted."""
    prefix = tokenizer.decode(token_ids[state.prefix_offset:state.read_offset])
    full = tokenizer.decode(token_ids[state.prefix_offset:])
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        state.prefix_offset = state.read_offset
        state.read_offset = len(token_ids)
        return full[len(prefix):]
    return ""


def replay_detokenizer(tokenizer: Tokenizer | None, token_ids: list[int],
                       num_prompt_tokens: int) -> DetokenizerState:
    """The detokenizer's state after emitting every output token of ``token_ids`` one by one, as
    the engine did: what a request rebuilt from its tokens alone continues from."""
    state = DetokenizerState.after_prompt(num_prompt_tokens)
    if tokenizer is not None:
        for end in range(num_prompt_tokens + 1, len(token_ids) + 1):
            detokenize_step(tokenizer, token_ids[:end], state)
    return state
