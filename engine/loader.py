"""Weight loading from a local Hugging Face directory (single or sharded safetensors).

Checkpoint names are mapped onto the engine's fused parameters: q/k/v go into row slices of
``qkv_proj``, gate/up into ``gate_up_proj``. A worker of a parallel instance reads only its shard:
its stage's layers, its tp rank's rows or columns (``engine/parallel.py``). Every parameter must be filled exactly once; anything
missing is an error that names it (silently random weights are the worst failure a loader has).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from tandem.engine.config import ModelConfig
from tandem.engine.model import CausalLM
from tandem.engine.parallel import WorkerShard, head_range, kv_head_range, layer_range, split_range

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


class _Piece(NamedTuple):
    """Where (part of) a checkpoint tensor goes: engine parameter ``target``, its rows ``rows`` (a
    slice of a fused weight; None: all of it), from the checkpoint tensor's indices ``take`` along
    dimension ``dim`` (None: all of it; a tp shard takes its rows or columns) of the ``full``
    the model's shape gives that dimension."""

    target: str
    rows: tuple[int, int] | None = None
    dim: int = 0
    take: range | None = None
    full: int = 0


def _fused_pieces(config: ModelConfig, shard: WorkerShard, prefix: str, module: str, kind: str) -> _Piece:
    """A q/k/v or gate/up tensor (weight or bias): this rank's output rows, placed in its fused
    weight (q then k then v; gate then up)."""
    tp, rank, dim = shard.parallelism.tp, shard.tp_rank, config.head_dim
    fused, index = _FUSED[module]
    if fused.endswith("qkv_proj"):
        q, kv = head_range(config.num_heads, tp, rank), kv_head_range(config.num_kv_heads, tp, rank)
        heads = [q, kv, kv][index]
        sizes = [len(q) * dim, len(kv) * dim, len(kv) * dim]
        take = range(heads.start * dim, heads.stop * dim)
        full = [config.q_size, config.kv_size, config.kv_size][index]
    else:
        take = split_range(config.intermediate_size, tp, rank)
        sizes, full = [len(take)] * 2, config.intermediate_size
    start = sum(sizes[:index])
    return _Piece(f"{prefix}.{fused}.{kind}", (start, start + sizes[index]), 0, take, full)


def _layer_pieces(config: ModelConfig, shard: WorkerShard, layer: int, rest: str) -> list[_Piece]:
    stage = layer_range(config.num_layers, shard.parallelism.pp, shard.pp_rank)
    if layer not in stage:
        return []
    prefix = f"layers.{layer - stage.start}"
    module, _, kind = rest.rpartition(".")
    if module in _FUSED:
        return [_fused_pieces(config, shard, prefix, module, kind)]
    tp, rank = shard.parallelism.tp, shard.tp_rank
    if module == "self_attn.o_proj" and kind == "weight":
        heads = head_range(config.num_heads, tp, rank)
        columns = range(heads.start * config.head_dim, heads.stop * config.head_dim)
        return [_Piece(f"{prefix}.{rest}", None, 1, columns, config.q_size)]
    if module == "mlp.down_proj" and kind == "weight":
        columns = split_range(config.intermediate_size, tp, rank)
        return [_Piece(f"{prefix}.{rest}", None, 1, columns, config.intermediate_size)]
    return [_Piece(f"{prefix}.{rest}")]  # norms, and o_proj's bias (held by tp rank 0 alone)


def _pieces(config: ModelConfig, shard: WorkerShard, name: str) -> list[_Piece]:
    """Where a checkpoint tensor goes in this worker's shard ([] if nowhere)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        vocab = split_range(config.vocab_size, shard.parallelism.tp, shard.tp_rank)
        # A tied pair may be stored as either name (some converters keep only the head).
        targets = (["embed_tokens.weight", "lm_head.weight"] if config.tie_word_embeddings
                   else ["embed_tokens.weight" if name.startswith("model.") else "lm_head.weight"])
        return [_Piece(target, None, 0, vocab, config.vocab_size) for target in targets]
    if name.startswith("model.") and not name.startswith("model.layers."):
        return [_Piece(name[len("model."):])]
    match = _LAYER.match(name)
    if not match:
        return [_Piece(name)]
    return _layer_pieces(config, shard, int(match.group(1)), match.group(2))


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Fill every parameter of `model` (one worker's shard) from the checkpoint, casting to the
    model's dtype."""
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {}
    for name, tensor in iter_checkpoint(model_dir):
        for piece in _pieces(config, model.shard, name):
            if piece.target not in params:
                continue  # e.g. rotary inv_freq buffers, or a part another worker holds
            dest = params[piece.target].data
            if piece.rows is not None:
                dest = dest[piece.rows[0]:piece.rows[1]]
            source = tensor
            if piece.take is not None and tensor.dim() > piece.dim and tensor.shape[piece.dim] == piece.full:
                source = tensor.narrow(piece.dim, piece.take.start, len(piece.take))
            if dest.shape != source.shape:
                raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} gives "
                                      f"{tuple(source.shape)} here, expected {tuple(dest.shape)}")
            dest.copy_(source)
            filled[piece.target] = filled.get(piece.target, 0) + dest.shape[0]
    _check_complete(model, params, filled)


def _check_complete(model: CausalLM, params: dict, filled: dict[str, int]) -> None:
    if model.config.tie_word_embeddings:
        filled.setdefault("lm_head.weight", filled.get("embed_tokens.weight", 0))
    missing = [n for n, p in params.items() if filled.get(n, 0) < p.shape[0]]
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise WeightLoadError(f"checkpoint is missing weights for: {shown}")
