"""Model shapes from config.json, hardware profiles, memory sizing and the analytic latency model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.placement.hardware import CustomHardware, get_profile, profile_from_custom
from tandem.placement.latency import AnalyticLatency, kv_transfer_cost
from tandem.placement.memory import instance_memory
from tandem.placement.model_spec import bundled_models, load_model, model_from_config, normalize_dtype
from tandem.placement.policy import Policy

A100 = get_profile("A100-80GB")


@pytest.mark.parametrize("name, billions", [
    ("opt-13b", 12.85), ("opt-66b", 65.7), ("opt-175b", 174.6),  # published OPT sizes
    ("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-2-70b", 68.98), ("llama-3-8b", 8.03),
])
def test_parameter_counts_match_published_sizes(name: str, billions: float) -> None:
    assert load_model(name).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_kv_bytes_per_token_uses_kv_heads() -> None:
    llama3 = load_model("llama-3-8b")  # GQA: 8 KV heads of 128
    assert (llama3.kv_heads, llama3.head_dim) == (8, 128)
    assert llama3.kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2
    opt = load_model("opt-13b")  # OPT has no kv-heads field: every head has its own K and V
    assert opt.kv_heads == opt.heads == 40
    assert opt.kv_bytes_per_token("fp16") == 2 * 40 * 5120 * 2
    assert opt.tied_embeddings and opt.learned_positions and not opt.gated_mlp
    assert llama3.gated_mlp and not llama3.tied_embeddings


def test_load_model_from_path_directory_and_fixture(tmp_path: Path) -> None:
    config = json.loads((Path("placement/fixtures") / "llama-2-7b.json").read_text())
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(config))
    by_dir = load_model(str(tmp_path / "my-model"))
    by_file = load_model(str(tmp_path / "my-model" / "config.json"))
    assert by_dir.name == by_file.name == "my-model"
    assert by_dir.params == load_model("LLaMA-2-7B").params
    assert "opt-13b" in bundled_models()


def test_load_model_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a config.json"):
        load_model("gpt-17")
    with pytest.raises(ValueError, match="num_attention_heads"):
        model_from_config({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10}, "x")
    with pytest.raises(ValueError, match="not a multiple"):
        model_from_config({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10,
                           "num_attention_heads": 8, "num_key_value_heads": 3}, "x")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(str(tmp_path))


def test_dtype_aliases() -> None:
    assert normalize_dtype("float16") == "fp16"
    assert normalize_dtype("BFloat16") == "bf16"
    with pytest.raises(ValueError, match="unknown dtype"):
        normalize_dtype("fp4")


def test_hardware_profiles_and_custom_overrides() -> None:
    for name in ("A100-40GB", "A100-80GB", "H100-80GB", "H200", "L40S", "cpu"):
        hw = get_profile(name)
        assert hw.memory_bytes > 0 and hw.mem_bw > 0 and hw.inter_node_bw < hw.intra_node_bw
    assert get_profile("h100-80gb").peak_flops("bf16") > A100.peak_flops("bf16")
    with pytest.raises(ValueError, match="not supported"):
        A100.peak_flops("fp8")
    slow = profile_from_custom(CustomHardware(base="A100-80GB", inter_node_gb_s=3.125))
    assert slow.inter_node_bw == pytest.approx(3.125e9)
    assert slow.mem_bw == A100.mem_bw
    with pytest.raises(ValueError, match="memory_gib: required"):
        profile_from_custom(CustomHardware(tflops={"fp16": 100}))
    with pytest.raises(ValueError, match="compute_efficiency: must be <= 1"):
        profile_from_custom(CustomHardware(base="cpu", compute_efficiency=2))


def test_memory_shrinks_per_device_with_parallelism() -> None:
    opt = load_model("opt-66b")
    one = instance_memory(opt, A100, "fp16", 1, 1, Policy())
    two = instance_memory(opt, A100, "fp16", 2, 1, Policy())
    assert one.kv_tokens == 0 and not one.fits_weights  # 132 GB of weights on one 80 GB device
    free = two.usable_bytes - two.weight_bytes - two.workspace_bytes
    assert two.fits_weights and two.kv_tokens == int(free / (opt.kv_bytes_per_token("fp16") / 2))
    assert two.weight_bytes == pytest.approx(opt.weight_bytes("fp16") / 2)
    assert instance_memory(opt, A100, "fp16", 2, 2, Policy()).kv_tokens > 2 * two.kv_tokens


def test_decode_step_is_memory_bound_at_batch_one() -> None:
    opt = load_model("opt-13b")
    step = AnalyticLatency(opt, A100, "fp16", 1, 1).decode(1, 512)
    weights_read = opt.weight_bytes("fp16") / (A100.mem_bw * A100.bandwidth_efficiency)
    assert weights_read < step < weights_read + A100.step_overhead_s + 0.002


def test_latency_scales_the_right_way() -> None:
    opt = load_model("opt-13b")
    tp1, tp2 = (AnalyticLatency(opt, A100, "fp16", tp, 1) for tp in (1, 2))
    assert tp1.prefill(1, 2048, 2048**2)[0] > tp1.prefill(1, 512, 512**2)[0] * 3.5  # compute bound
    assert tp2.prefill(1, 1024, 1024**2)[0] < tp1.prefill(1, 1024, 1024**2)[0] * 0.6
    assert tp1.decode(64, 64 * 1000) > tp1.decode(64, 64 * 100)  # KV reads grow with context
    # Prompts in a colocated step are not free: they add their GEMM time to the decode step.
    assert tp1.mixed(1, 512, 512**2, 64, 64 * 500) > tp1.decode(64, 64 * 500) + 0.02
    pp2 = AnalyticLatency(opt, A100, "fp16", 1, 2)
    latency, busy = pp2.prefill(1, 1024, 1024**2)
    assert busy < 0.6 * latency  # a 2-stage pipeline takes the next batch halfway through


def test_kv_transfer_same_node_is_faster_and_parallel_links_help() -> None:
    opt = load_model("opt-13b")
    fixed, local = kv_transfer_cost(opt, A100, "fp16", 1, 1, True)
    _, remote = kv_transfer_cost(opt, A100, "fp16", 1, 1, False)
    _, remote4 = kv_transfer_cost(opt, A100, "fp16", 4, 4, False)
    assert local < remote and remote4 == pytest.approx(remote / 4)
    # 512 tokens of OPT-13B KV (400 MiB) over one 25 GB/s NIC: ~17 ms.
    assert 512 * remote == pytest.approx(512 * 819200 / 25e9)
