"""The independent reference for engine tests: Hugging Face ``transformers`` on the same weights.

Engine parity tests compare our outputs with these helpers, never with the engine itself. Tiny models
are built here with random weights; the real-model reference loads SmolLM2 straight from its GGUF, so a
bug in our own conversion (`engine.prepare`) cannot hide in both sides of a comparison.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

Arch = Literal["llama", "qwen2", "mistral"]

# Small enough to build and run in well under a second; GQA (4 query heads, 2 KV heads) on purpose.
TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
    # 0.02 (transformers' default) gives near-uniform logits, where greedy argmax ties are fragile.
    initializer_range=0.1,
)

LLAMA3_ROPE: dict[str, Any] = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    # Far below max_position_embeddings so the frequency rescaling changes many rotary dimensions.
    original_max_position_embeddings=64,
)


def hf_load(model_dir: str | os.PathLike[str]) -> Any:
    """A transformers causal LM from a HF directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=torch.float32).eval()


@functools.lru_cache(maxsize=1)
def hf_model_from_gguf() -> Any:
    """SmolLM2 loaded by transformers directly from the packaged GGUF (dequantized to fp32).

    Cached per process: loading takes ~20 s on two cores. Do not mutate the returned model.
    """
    from tandem.engine.prepare import smollm2_gguf_path
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=1)
def hf_tokenizer_from_gguf() -> Any:
    """SmolLM2's tokenizer as transformers builds it from the GGUF (~8 s)."""
    from tandem.engine.prepare import smollm2_gguf_path
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@torch.no_grad()
def hf_greedy(model: Any, prompts_token_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new tokens only) of each prompt, exactly `max_new_tokens` each.

    `model` is a transformers model or a directory. Prompts run one at a time, so no padding or
    attention-mask effects. EOS does not stop generation (``eos_token_id=None``) and is not masked
    either (unlike ``min_new_tokens``), matching an engine run with ignore_eos.
    """
    if isinstance(model, (str, os.PathLike)):
        model = hf_load(model)
    outputs: list[list[int]] = []
    for prompt in prompts_token_ids:
        input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
            pad_token_id=model.config.pad_token_id or 0)
        new = out[0, len(prompt):].tolist()
        if len(new) != max_new_tokens:  # generate() stopped early: EOS was not really disabled
            raise AssertionError(f"reference produced {len(new)} tokens, wanted {max_new_tokens}")
        outputs.append(new)
    return outputs


def make_tiny_model(
    tmp_path: str | os.PathLike[str],
    arch: Arch = "llama",
    *,
    tied: bool = False,
    llama3_rope: bool = False,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    seed: int = 0,
    name: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random-weight fp32 model in HF format under `tmp_path` and return its directory.

    `overrides` go to the transformers config (e.g. ``num_hidden_layers=3``). ``max_shard_size``
    (e.g. ``"100KB"``) writes a sharded checkpoint with ``model.safetensors.index.json``. With
    `tokenizer`, a byte-level tokenizer (token id == byte value) is written when the vocab has 256+ ids.
    """
    config = _tiny_config(arch, tied=tied, llama3_rope=llama3_rope, overrides=overrides)
    torch.manual_seed(seed)
    model = _model_class(arch)(config).to(torch.float32).eval()
    _randomize_vectors(model, seed)
    out = _fresh_dir(Path(tmp_path), name or _default_name(arch, tied, llama3_rope, max_shard_size))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if tokenizer and config.vocab_size >= 256:
        write_byte_tokenizer(out)
    return out


def _tiny_config(arch: Arch, *, tied: bool, llama3_rope: bool, overrides: dict[str, Any]) -> Any:
    params = {**TINY_DEFAULTS, "tie_word_embeddings": tied, **overrides}
    if llama3_rope:
        if arch != "llama":
            raise ValueError("llama3 rope scaling is a Llama variant")
        params["rope_parameters"] = dict(LLAMA3_ROPE)
    return _config_class(arch)(**params)


def _config_class(arch: Arch) -> Any:
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(classes)}")
    return getattr(transformers, classes[arch])


def _model_class(arch: Arch) -> Any:
    import transformers

    return getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "mistral": "MistralForCausalLM"}[arch])


@torch.no_grad()
def _randomize_vectors(model: torch.nn.Module, seed: int) -> None:
    """Make norm weights and biases random: transformers initializes them to 1 and 0, which would
    let a loader that skips them (e.g. Qwen2's q/k/v biases) pass every comparison."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if param.dim() != 1:
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if name.endswith("bias"):
            param.copy_(0.1 * noise)
        else:  # RMSNorm scales stay near 1 so activations keep their size
            param.copy_(1.0 + 0.1 * noise)


def _default_name(arch: str, tied: bool, llama3_rope: bool, max_shard_size: str | None) -> str:
    parts = ["tiny", arch]
    if tied:
        parts.append("tied")
    if llama3_rope:
        parts.append("llama3rope")
    if max_shard_size:
        parts.append("sharded")
    return "-".join(parts)


def _fresh_dir(parent: Path, name: str) -> Path:
    # Several builds may share one tmp_path; never overwrite an earlier one.
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    candidate.mkdir(parents=True)
    return candidate


def write_byte_tokenizer(model_dir: Path) -> None:
    """A 256-token byte-level BPE tokenizer with no merges: token id == UTF-8 byte value.

    Cheap, deterministic and text-capable, so tiny models can take string prompts; it has no special
    tokens (config.json's bos/eos ids are ordinary bytes for tiny models).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character map, which ByteLevel pre-tokenization emits.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@torch.no_grad()
def hf_top2_gap(model: Any, token_ids: list[int]) -> float:
    """The reference's gap between its two largest next-token logits after ``token_ids``: how
    close greedy decoding was to a tie there."""
    logits = model(torch.tensor([token_ids])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def assert_greedy_close(model: Any, prompt: list[int], got: list[int], want: list[int],
                        tie_gap: float = 1e-4) -> None:
    """``got`` equals the reference's greedy ``want``, or first differs where the reference itself
    nearly tied (sums reordered across workers may flip a near-tie, nothing else)."""
    if got == want:
        return
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    gap = hf_top2_gap(model, prompt + want[:step])
    assert gap < tie_gap, (f"output differs from the reference at step {step} ({got[step:step + 3]} vs "
                           f"{want[step:step + 3]}) where its top-2 logit gap is {gap:.2e}, not a near-tie")
