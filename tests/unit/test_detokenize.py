"""Incremental detokenization: fed one token at a time, the emitted pieces concatenate to the full
decode (by the `tokenizers` library itself) and never contain a half character (U+FFFD)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from tandem.engine.tokenizer import DetokenizerState, Tokenizer, detokenize_step

TEXTS = [
    "héllo 世界 🚀 naïve café",
    "日本語のテキストを少し長めに書いてみます。句読点も含めて。",
    "🚀🚀🚀👩‍👩‍👧‍👦 family, 🇫🇷 flag, and ｆｕｌｌｗｉｄｔｈ",
    "Ünïcödé — “quotes” … ½ ≠ ∞; Ελληνικά, русский, עברית, العربية",
    "  leading spaces, trailing ones  \n\ttabs\n\nand\r\nnewlines ",
    "code: def f(x):\n    return x ** 2  # ² ✓",
    "a",
]


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def byte_tok(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_llama_dir / "tokenizer.json")


def stream(tok: Tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    """Feed `output` one token at a time after `prompt`, as the engine does; the emitted pieces."""
    ids = list(prompt)
    state = DetokenizerState.after_prompt(len(prompt))
    pieces = []
    for token in output:
        ids.append(token)
        pieces.append(detokenize_step(tok, ids, state))
    return pieces


def assert_clean(pieces: list[str]) -> None:
    bad = [p for p in pieces if "\ufffd" in p]
    assert not bad, f"emitted a replacement character: {bad}"


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_equals_full_decode(smollm2_tok: Tokenizer, smollm2_ref: HFTokenizer, text: str) -> None:
    ids = smollm2_ref.encode(text, add_special_tokens=False).ids
    pieces = stream(smollm2_tok, [], ids)
    assert_clean(pieces)
    full = smollm2_ref.decode(ids, skip_special_tokens=True)
    assert full == text  # byte-level BPE is lossless: the reference itself is right
    assert "".join(pieces) == full


def test_smollm2_multibyte_chars_really_span_tokens(smollm2_ref: HFTokenizer) -> None:
    """Otherwise the test above would not exercise holding back partial characters."""
    ids = smollm2_ref.encode("🚀 世界 naïve", add_special_tokens=False).ids
    partial = [i for i in range(1, len(ids) + 1) if smollm2_ref.decode(ids[:i]).endswith("\ufffd")]
    assert partial


@pytest.mark.parametrize("text", TEXTS[:4])
def test_smollm2_stream_after_a_prompt(smollm2_tok: Tokenizer, smollm2_ref: HFTokenizer, text: str) -> None:
    prompt = smollm2_ref.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n",
                                add_special_tokens=False).ids
    output = smollm2_ref.encode(text + "<|im_end|>", add_special_tokens=False).ids
    pieces = stream(smollm2_tok, prompt, output)
    assert_clean(pieces)
    assert "".join(pieces) == text  # the special end token decodes to nothing


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.text(max_size=12), text=st.text(min_size=1, max_size=40))
def test_smollm2_stream_any_text(smollm2_tok: Tokenizer, smollm2_ref: HFTokenizer, prefix: str, text: str) -> None:
    prompt = smollm2_ref.encode(prefix, add_special_tokens=False).ids
    output = smollm2_ref.encode(text, add_special_tokens=False).ids
    # SmolLM2's vocabulary lacks a few bytes (e.g. 0xF1, lead byte of planes 4-7), which its BPE
    # silently drops: only text the tokenizer itself round-trips says anything about detokenizing.
    assume(smollm2_ref.decode(prompt + output) == prefix + text)
    pieces = stream(smollm2_tok, prompt, output)
    assert_clean(pieces)
    full = smollm2_ref.decode(prompt + output, skip_special_tokens=True)
    assert "".join(pieces) == full[len(smollm2_ref.decode(prompt, skip_special_tokens=True)):]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_holds_back_split_characters(byte_tok: Tokenizer, text: str) -> None:
    ids = list(text.encode())  # one token per UTF-8 byte
    assert byte_tok.encode(text) == ids
    pieces = stream(byte_tok, [], ids)
    assert_clean(pieces)
    assert "".join(pieces) == text
    # Each character appears exactly when its last byte arrives.
    want, pos = [], 0
    for char in text:
        n = len(char.encode())
        want += [""] * (n - 1) + [char]
        pos += n
    assert pieces == want


def test_byte_tokenizer_after_prompt_ending_on_a_char_boundary(byte_tok: Tokenizer) -> None:
    prompt = list("préfixe 世".encode())
    output = list("界 🚀!".encode())
    pieces = stream(byte_tok, prompt, output)
    assert_clean(pieces)
    assert "".join(pieces) == "界 🚀!"
