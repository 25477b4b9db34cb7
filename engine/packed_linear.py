"""Linear layers with oneDNN-prepacked weights, for bf16 on CPU.

``F.linear`` on a bf16 CPU tensor hands oneDNN the weight in plain row-major layout, and oneDNN
reorders it into its blocked (AMX/VNNI) layout on *every* call. For decode-sized batches that
reorder costs as much as the multiply itself. Packing each weight once at load time removes it,
with bit-identical outputs (same kernel, same accumulation order; speed-up in
benchmarks/RESULTS.md, "engine/packed_linear.py"). Large prefill batches are unaffected.
"""
from __future__ import annotations

import torch
from torch import nn


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ weight.T + bias``; ``weight`` plain ``[out, in]`` or prepacked
    (``torch.ops.mkldnn._reorder_linear_weight``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def packing_available(dtype: torch.dtype, device: str) -> bool:
    """Whether prepacking applies: bf16 on a CPU whose torch has oneDNN with bf16 support."""
    if dtype != torch.bfloat16 or device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """Inference-only stand-in for ``nn.Linear`` holding the weight in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Not a parameter: an opaque oneDNN tensor, meaningless to state_dict or .to().
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.packed, self.bias)
