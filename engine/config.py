"""Model configuration: a Hugging Face ``config.json`` parsed into one frozen struct.

Accepts both the classic form (``rope_theta`` / ``rope_scaling``) and the transformers-5 form
(``rope_parameters``). The architecture registry lives here so that an unsupported model fails at
load time with the list of what is supported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

# Architectures the Llama-family decoder implements, and what differs between them.
SUPPORTED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": False},
    "MistralForCausalLM": {"qkv_bias": False},
    "Qwen2ForCausalLM": {"qkv_bias": True},
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the engine implements."""


class RopeScaling(msgspec.Struct, frozen=True):
    """Only the ``llama3`` scaling type (Llama 3.1+) changes the frequencies; others are refused."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True):
    """The shape of a Llama-family decoder, independent of the config.json dialect."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    # Attention is full-context here, so contexts stop at the window (Mistral) to stay exact.
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_settings(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Read rope theta and scaling from either config dialect."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    # Some converted checkpoints lack `architectures`; fall back on model_type.
    if not archs and model_type:
        archs = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}.get(model_type, str(model_type))]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise UnsupportedModelError(
        f"architecture {archs or model_type!r} is not supported; supported: "
        + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a config.json dict (either dialect)."""
    arch = _architecture(raw)
    theta, scaling = _rope_settings(raw)
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // heads
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(SUPPORTED_ARCHITECTURES[arch]["qkv_bias"] or raw.get("attention_bias", False)),
        # Llama's `attention_bias` also biases o_proj; Qwen2's built-in q/k/v bias does not.
        o_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        sliding_window=_sliding_window(raw),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    if raw.get("use_sliding_window") is False:  # Qwen2 writes a window but disables it
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def load_config(model_dir: Path) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` EOS ids when present)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from exc
    try:
        config = parse_config(raw)
    except KeyError as exc:
        raise ValueError(f"{path}: missing field {exc.args[0]!r}") from exc
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        extra = _as_id_tuple(gen.get("eos_token_id"))
        merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
        config = msgspec.structs.replace(config, eos_token_ids=merged)
    return config
