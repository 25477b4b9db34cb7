"""Model shapes from a Hugging Face config.json: parameter count, FLOPs, KV bytes per token.

Handles the two config dialects we plan for: OPT (`ffn_dim`, no KV heads, tied LM head, learned
positions) and Llama-style (`intermediate_size`, `num_key_value_heads`, gated MLP, RoPE).
"""
from __future__ import annotations

import json
from pathlib import Path

import msgspec

FIXTURES = Path(__file__).parent / "fixtures"

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16", "float8": "fp8", "float8_e4m3fn": "fp8"}


def normalize_dtype(name: str) -> str:
    """Canonical dtype name (fp16, bf16, fp32, fp8, int8); ValueError on unknown names."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPE_BYTES)})")
    return key


class ModelSpec(msgspec.Struct, frozen=True):
    """The shape of a decoder-only transformer, enough to cost its steps and size its memory."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    gated_mlp: bool  # SwiGLU: three FFN matrices instead of two
    tied_embeddings: bool
    learned_positions: bool
    default_dtype: str = "fp16"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one transformer block (norms and biases are noise next to the matrices)."""
        attention = self.hidden * self.q_dim * 2 + self.hidden * self.kv_dim * 2  # q, o, k, v
        mlp = self.hidden * self.ffn * (3 if self.gated_mlp else 2)
        return attention + mlp

    @property
    def embedding_params(self) -> int:
        params = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        if self.learned_positions:
            params += self.max_positions * self.hidden
        return params

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params

    def weight_bytes(self, dtype: str) -> float:
        return self.params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> float:
        """K and V of one token across all layers."""
        return 2 * self.layers * self.kv_dim * DTYPE_BYTES[dtype]


def _get(config: dict, *keys: str, default: object = None) -> object:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is None:
        raise ValueError(f"config.json lacks {' / '.join(keys)}")
    return default


def model_from_config(config: dict, name: str) -> ModelSpec:
    """Parse a config.json dict; ValueError names the missing or inconsistent field."""
    hidden = int(_get(config, "hidden_size", "d_model", "n_embd"))  # type: ignore[arg-type]
    heads = int(_get(config, "num_attention_heads", "n_head"))  # type: ignore[arg-type]
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))  # type: ignore[arg-type]
    head_dim = int(_get(config, "head_dim", default=hidden // heads))  # type: ignore[arg-type]
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    is_opt = config.get("model_type") == "opt" or "ffn_dim" in config
    gated = not is_opt and str(config.get("hidden_act", "silu")) in ("silu", "swiglu", "gelu_pytorch_tanh")
    ffn = int(_get(config, "ffn_dim", "intermediate_size", "n_inner",  # type: ignore[arg-type]
                   default=4 * hidden))
    # OPT and GPT-2 tie the LM head to the input embedding; Llama configs default to untied.
    tied = bool(config.get("tie_word_embeddings", is_opt))
    return ModelSpec(
        name=name, hidden=hidden, ffn=ffn,
        layers=int(_get(config, "num_hidden_layers", "n_layer")),  # type: ignore[arg-type]
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=int(_get(config, "vocab_size")),  # type: ignore[arg-type]
        max_positions=int(_get(config, "max_position_embeddings", "n_positions",  # type: ignore[arg-type]
                               default=2048)),
        gated_mlp=gated, tied_embeddings=tied, learned_positions=is_opt,
        default_dtype=normalize_dtype(str(config.get("torch_dtype") or "float16")),
    )


def bundled_models() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def load_model(ref: str, base_dir: Path | None = None) -> ModelSpec:
    """Resolve ``ref``: a config.json path, a directory holding one, or a bundled fixture name."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        path = path / "config.json"
        name = path.parent.name
    elif path.suffix == ".json":
        name = path.stem if path.stem != "config" else path.parent.name
    else:
        fixture = FIXTURES / f"{ref.lower()}.json"
        if not fixture.exists():
            raise ValueError(f"{ref!r} is neither a config.json, a directory with one, nor a bundled "
                             f"model ({', '.join(bundled_models())})")
        path, name = fixture, ref.lower()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return model_from_config(config, name)
