"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Input is a flat, packed batch of tokens (``[T]``) plus ``AttentionMetadata``; output is the logits
of the tokens whose logits the step needs. q/k/v and gate/up are fused into single matmuls (the
loader fills the fused weights from the checkpoint's separate tensors).

A model may be one worker's shard of a (tp, pp) instance (``engine/parallel.py``): its layers are
its stage's, its attention heads, KV heads and MLP columns its tp rank's (q/k/v and gate/up split
by column, o and down by row, each block's output summed over the tp group), its embedding and LM
head its rank's slice of the vocabulary. The first stage embeds; later stages receive activations
from the one before; the last stage's tp rank 0 returns the logits (other workers return None).
"""
from __future__ import annotations

import torch
from torch import nn

from torch.nn import functional as F

from tandem.engine.attention import AttentionMetadata, step_attention, write_kv
from tandem.engine.collective import Collective, Solo
from tandem.engine.config import ModelConfig
from tandem.engine.fused import rope_
from tandem.engine.layers import RMSNorm, RotaryEmbedding, SwiGLU
from tandem.engine.parallel import WorkerShard, head_range, kv_head_range, layer_range, single_worker, split_range


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: WorkerShard, comm: Collective) -> None:
        super().__init__()
        tp, rank = shard.parallelism.tp, shard.tp_rank
        self.num_heads = len(head_range(config.num_heads, tp, rank))
        self.num_kv_heads = len(kv_head_range(config.num_kv_heads, tp, rank))
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = config.head_dim**-0.5
        self.comm = comm
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        # Row-parallel: the bias is added once, by tp rank 0, before the sum over ranks.
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias and rank == 0)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused projection: rotate both head sets in one pass.
        rope_(qkv, self.num_heads + self.num_kv_heads, *rope)
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        q = qkv[:, :q_end].view(tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_end:k_end].view(tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, k_end:].view(tokens, self.num_kv_heads, self.head_dim)
        write_kv(kv_layer, k, v, meta.slot_mapping)
        out = step_attention(q, k, v, kv_layer, meta, self.scale)
        return self.comm.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: WorkerShard, comm: Collective) -> None:
        super().__init__()
        self.comm = comm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, shard, comm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        intermediate = split_range(config.intermediate_size, shard.parallelism.tp, shard.tp_rank)
        self.mlp = SwiGLU(config.hidden_size, len(intermediate))

    def forward(self, x, pending, rope, kv_layer, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the residual stream (updated in place); ``pending`` the previous layer's MLP
        output, not yet added: each residual add is fused into the norm that follows it."""
        h = self.input_layernorm(x, residual=pending)
        h = self.post_attention_layernorm(x, residual=self.self_attn(h, rope, kv_layer, meta))
        return x, self.comm.all_reduce(self.mlp(h))


class VocabEmbedding(nn.Module):
    """The embedding rows of one tp rank's vocabulary slice; ids outside it embed to zero, and the
    sum over ranks is the full lookup. With one rank, a plain lookup."""

    def __init__(self, vocab: range, hidden: int, comm: Collective, whole: bool) -> None:
        super().__init__()
        self.first, self.rows = vocab.start, len(vocab)
        self.weight = nn.Parameter(torch.empty(len(vocab), hidden))
        self.comm = comm
        self.whole = whole

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.comm.all_reduce(out)


class CausalLM(nn.Module):
    """Decoder stack + LM head (this worker's shard). ``kv_cache`` is
    ``[stage layers, 2, blocks, block_size, rank's KV heads, D]``."""

    def __init__(self, config: ModelConfig, max_positions: int, shard: WorkerShard | None = None,
                 comm: Collective | None = None) -> None:
        super().__init__()
        self.config = config
        self.shard = shard = shard or single_worker()
        self.comm = comm = comm or Solo()
        tp, rank = shard.parallelism.tp, shard.tp_rank
        self.vocab_widths = [len(split_range(config.vocab_size, tp, r)) for r in range(tp)]
        vocab = split_range(config.vocab_size, tp, rank)
        self.layer_ids = layer_range(config.num_layers, shard.parallelism.pp, shard.pp_rank)
        if shard.is_first_stage:
            self.embed_tokens = VocabEmbedding(vocab, config.hidden_size, comm, whole=tp == 1)
        self.layers = nn.ModuleList(DecoderLayer(config, shard, comm) for _ in self.layer_ids)
        self.rope = RotaryEmbedding(config, max_positions)
        if shard.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, len(vocab), bias=False)
            if config.tie_word_embeddings and shard.is_first_stage:
                self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        logits_index: torch.Tensor,
    ) -> torch.Tensor | None:
        """fp32 logits ``[len(logits_index), vocab]`` on the output worker, None on the others."""
        if self.shard.is_first_stage:
            x = self.embed_tokens(input_ids)
        else:
            x = self.comm.recv_prev((input_ids.shape[0], self.config.hidden_size), kv_cache)
        rope = self.rope.tables(positions, x.dtype)
        pending = None
        for layer, kv_layer in zip(self.layers, kv_cache):
            x, pending = layer(x, pending, rope, kv_layer, meta)
        if pending is not None:
            x.add_(pending)
        if not self.shard.is_last_stage:
            self.comm.send_next(x)
            return None
        x = self.norm(x.index_select(0, logits_index))
        return self.comm.gather_columns(self.lm_head(x).float(), self.vocab_widths)
