"""The native small-M GEMM behind ``KernelLinear`` against float64 matmuls computed by torch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tandem.engine.kernel_linear import (SMALL_M, KernelLinear, kernel_linears_apply, native_bf16_cpu,
                                         onednn_prefill, pack_panels, panel_width, small_gemm_available,
                                         unpack_panels)

needs_kernel = pytest.mark.skipif(not small_gemm_available(), reason="no small GEMM here (needs AVX-512 or AVX2)")

# Rows on both sides of the 6- and 12-row register tiles (AVX2, AVX-512) and of the kernel/MKL switch.
ROWS = [1, 5, 6, 7, 11, 12, 13, 32, SMALL_M, SMALL_M + 1, 300]
# Widths on both sides of the 8/16-lane halves and 16/32-column panels.
SHAPES = [(96, 160), (33, 47), (576, 960), (64, 1), (40, 16), (40, 17)]


def _reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x W^T + b in float64, written out (not F.linear: that is what the layer calls for large
    batches)."""
    out = x.double() @ linear.weight.double().T
    return out if linear.bias is None else out + linear.bias.double()


def _assert_close_to_float64(got: torch.Tensor, want: torch.Tensor, tolerance: float, label: object = "") -> None:
    """Relative error against the float64 result, relative to max(|want|, 1)."""
    scale = want.abs().clamp_min(1.0)
    assert ((got.double() - want).abs() / scale).max().item() <= tolerance, label


@needs_kernel
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_linear_matches_float64(dtype, in_features, out_features, bias) -> None:
    torch.manual_seed(in_features * out_features)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = KernelLinear(linear)
    for rows in ROWS:
        x = torch.randn(rows, in_features, dtype=dtype)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        # fp32: sums of <= 576 products in fp32; bf16: one output rounding (2^-8 relative).
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
        _assert_close_to_float64(got, _reference(x, linear), tolerance, f"{rows} rows")


@needs_kernel
def test_prefill_sized_fp32_batches_are_the_dense_gemm_bit_for_bit() -> None:
    """Beyond SMALL_M rows the fp32 path is a library GEMM, not the kernel: MKL, exactly
    ``F.linear`` (transformers' own prefill numerics), or where oneDNN is faster (CPUs not Intel's), its
    GEMM: the prepacked copy gives what oneDNN gives on the plain weight. (Accuracy against float64
    on both sides of SMALL_M: test_kernel_linear_matches_float64.)"""
    torch.manual_seed(1)
    linear = nn.Linear(200, 330)
    x = torch.randn(SMALL_M + 50, 200)
    if onednn_prefill():
        want = torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")
    else:
        want = F.linear(x, linear.weight, linear.bias)
    got = KernelLinear(linear)(x)
    assert torch.equal(got, want)
    # Bit-equal to a library GEMM says nothing if both are wrong the same way: the exact product.
    _assert_close_to_float64(got, _reference(x, linear), 1e-5)


@needs_kernel
@pytest.mark.parametrize("lead", [(2, 3), (2, 150)], ids=["kernel", "library-gemm"])
def test_leading_dimensions_and_empty_batches(lead) -> None:
    """Inputs with batch dimensions are flattened to rows and the result reshaped back, on both
    sides of SMALL_M (2 x 150 = 300 rows): row (i, j) of the output is x[i, j] W^T + b."""
    torch.manual_seed(24)
    linear = nn.Linear(24, 40)
    layer = KernelLinear(linear)
    x = torch.randn(*lead, 24)
    got = layer(x)
    assert got.shape == (*lead, 40)
    _assert_close_to_float64(got, _reference(x, linear), 1e-5)
    assert layer(torch.randn(0, 24)).shape == (0, 40)


@needs_kernel
def test_bf16_rounding_keeps_nan_and_infinity() -> None:
    linear = nn.Linear(16, 32, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    x = torch.ones(3, 16, dtype=torch.bfloat16)
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    out = KernelLinear(linear)(x)
    assert torch.all(out[0] == 16) and torch.isnan(out[1]).all() and torch.isposinf(out[2]).all()


@needs_kernel
def test_panels_round_trip_exactly() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(70, 9).to(dtype)
        panels = pack_panels(weight)
        width = panel_width()
        count = -(-70 // width)
        assert panels.shape == (count, 9, width) and torch.all(panels[-1, :, 70 - (count - 1) * width:] == 0)
        assert torch.equal(unpack_panels(panels, 70, dtype), weight)


def test_kernel_linears_only_where_they_win() -> None:
    assert not kernel_linears_apply(torch.float16, "cpu")
    assert not kernel_linears_apply(torch.float32, "cuda")
    assert kernel_linears_apply(torch.float32, "cpu") == small_gemm_available()
    # bf16 on a CPU with bf16 arithmetic stays on oneDNN's prepacked path.
    assert kernel_linears_apply(torch.bfloat16, "cpu") == (small_gemm_available() and not native_bf16_cpu())


@needs_kernel
def test_engine_models_run_every_linear_on_the_kernel(tiny_llama_dir: Path) -> None:
    from tandem.engine.config import load_config
    from tandem.engine.runner import build_model

    config = load_config(tiny_llama_dir)
    model = build_model(config, tiny_llama_dir, torch.float32, "cpu", 64)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, KernelLinear) for m in model.modules()) == 4 * config.num_layers + 1
