"""Prepacked bf16 linears must compute exactly what `F.linear` computes, at every batch size."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tandem.engine.kernel_linear import native_bf16_cpu
from tandem.engine.packed_linear import PackedLinear, packing_available

needs_packing = pytest.mark.skipif(not packing_available(torch.bfloat16, "cpu"),
                                   reason="this torch/CPU has no oneDNN bf16 linear")


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_linear_is_bit_identical_to_f_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias))


def test_packing_is_only_for_bf16_on_cpu() -> None:
    assert not packing_available(torch.float32, "cpu")
    assert not packing_available(torch.bfloat16, "cuda")


@needs_packing
@pytest.mark.skipif(not native_bf16_cpu(), reason="without bf16 arithmetic the engine uses KernelLinear")
def test_bf16_engine_packs_every_linear_and_keeps_logits(tiny_llama_dir: Path) -> None:
    """The engine's bf16 model has no plain nn.Linear left, and its logits equal the same weights
    run through torch's own `F.linear` (the packed copies are taken after loading)."""
    from tandem.engine.config import load_config
    from tandem.engine.runner import build_model

    config = load_config(tiny_llama_dir)
    model = build_model(config, tiny_llama_dir, torch.bfloat16, "cpu", 64)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.randn(5, config.hidden_size, dtype=torch.bfloat16)
    head = model.lm_head
    assert torch.equal(head(x), F.linear(x, model.embed_tokens.weight if config.tie_word_embeddings
                                         else _unpacked_head(tiny_llama_dir, config)))


def _unpacked_head(model_dir: Path, config) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights["lm_head.weight"].to(torch.bfloat16)
