"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Input is a flat, packed batch of tokens (``[T]``) plus ``AttentionMetadata``; output is the final
hidden state of the tokens whose logits the step needs. q/k/v and gate/up are fused into single
matmuls (the loader fills the fused weights from the checkpoint's separate tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from tandem.engine.attention import AttentionMetadata, decode_attention, prefill_attention, write_kv
from tandem.engine.config import ModelConfig
from tandem.engine.fused import rope_
from tandem.engine.layers import RMSNorm, RotaryEmbedding, SwiGLU


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)

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
        if meta.is_prefill:
            out = prefill_attention(q, k, v, meta.seq_lens, self.scale)
        else:
            out = decode_attention(q, kv_layer, meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, pending, rope, kv_layer, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the residual stream (updated in place); ``pending`` the previous layer's MLP
        output, not yet added: each residual add is fused into the norm that follows it."""
        h = self.input_layernorm(x, residual=pending)
        h = self.post_attention_layernorm(x, residual=self.self_attn(h, rope, kv_layer, meta))
        return x, self.mlp(h)


class CausalLM(nn.Module):
    """Decoder stack + LM head. ``kv_cache`` is ``[L, 2, blocks, block_size, Hkv, D]``."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """Returns fp32 logits ``[len(logits_index), vocab]``."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions, x.dtype)
        pending = None
        for layer, kv_layer in zip(self.layers, kv_cache):
            x, pending = layer(x, pending, rope, kv_layer, meta)
        if pending is not None:
            x.add_(pending)
        x = self.norm(x.index_select(0, logits_index))
        return self.lm_head(x).float()
