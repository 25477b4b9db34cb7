"""Weight loading from a local Hugging Face directory (single or sharded safetensors).

Checkpoint names are mapped onto the engine's fused parameters: q/k/v go into row slices of
``qkv_proj``, gate/up into ``gate_up_proj``. Every parameter must be filled exactly once; anything
missing is an error that names it (silently random weights are the worst failure a loader has).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from tandem.engine.config import ModelConfig
from tandem.engine.model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class WeightLoadError(ValueError):
    """The checkpoint is missing, corrupt or does not match the config."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{model_dir}: no *.safetensors weight files")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightLoadError(f"{model_dir}: weight files listed in the index are missing: {missing}")
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise WeightLoadError(f"{path}: corrupt or unreadable weight file ({exc})") from exc


def _shard_rows(config: ModelConfig, fused: str, index: int) -> tuple[int, int]:
    """Row range of shard `index` inside a fused weight."""
    if fused.endswith("qkv_proj"):
        sizes = [config.q_size, config.kv_size, config.kv_size]
    else:
        sizes = [config.intermediate_size] * 2
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _target(config: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None]:
    """Engine parameter name (and row slice for fused ones) of a checkpoint tensor name."""
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name[len("model."):], None
    match = _LAYER.match(name)
    if not match:
        return name, None
    layer, rest = match.groups()
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        fused, index = _FUSED[module]
        rows = _shard_rows(config, fused, index)
        return f"layers.{layer}.{fused}.{kind}", rows
    return f"layers.{layer}.{rest}", None


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Fill every parameter of `model` from the checkpoint, casting to the model's dtype."""
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {}
    for name, tensor in iter_checkpoint(model_dir):
        target, rows = _target(config, name)
        if target == "lm_head.weight" and config.tie_word_embeddings:
            target = "embed_tokens.weight"  # some converters store only the head of a tied pair
        if target not in params:
            continue  # e.g. rotary inv_freq buffers
        dest = params[target].data
        if rows is not None:
            dest = dest[rows[0]:rows[1]]
        if dest.shape != tensor.shape:
            raise WeightLoadError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        filled[target] = filled.get(target, 0) + (rows[1] - rows[0] if rows else dest.shape[0])
    _check_complete(model, params, filled)


def _check_complete(model: CausalLM, params: dict, filled: dict[str, int]) -> None:
    if model.config.tie_word_embeddings:
        filled.setdefault("lm_head.weight", filled.get("embed_tokens.weight", 0))
    missing = [n for n, p in params.items() if filled.get(n, 0) < p.shape[0]]
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise WeightLoadError(f"checkpoint is missing weights for: {shown}")
