"""Bad requests and bad model directories fail fast with an exception that names the problem, and
never disturb other requests or leak KV blocks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.engine import LLM, SamplingParams
from tandem.engine.config import UnsupportedModelError
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.loader import WeightLoadError
from tests.reference import hf_greedy, make_tiny_model

GOOD_PROMPT = [5, 17, 42, 99, 7, 200, 31]
GOOD = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
MAX_MODEL_LEN = 64
NUM_BLOCKS = 6  # x 16 = 96 tokens of KV cache


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(tiny_llama_dir, dtype="float32", block_size=16, num_blocks=NUM_BLOCKS,
               max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def big_context_llm(tiny_llama_dir: Path) -> LLM:
    """Context longer than the cache, so the cache capacity check is the one that trips."""
    return LLM(tiny_llama_dir, dtype="float32", block_size=16, num_blocks=NUM_BLOCKS)


@pytest.fixture(scope="module")
def good_reference(tiny_llama_dir: Path) -> list[int]:
    return hf_greedy(tiny_llama_dir, [GOOD_PROMPT], GOOD.max_tokens)[0]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.blocks.tables
    assert not engine.has_unfinished()


# --- bad requests ----------------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param([], GOOD, "prompt is empty", id="empty-ids"),
    pytest.param("", GOOD, "prompt is empty", id="empty-text"),
    pytest.param([5, 256, 7], GOOD, r"outside the vocabulary \[0, 256\)", id="id-too-big"),
    pytest.param([5, -1], GOOD, "outside the vocabulary", id="negative-id"),
    pytest.param([5] * 60, SamplingParams(max_tokens=10), "exceeds the model's context length 64",
                 id="beyond-max-model-len"),
    pytest.param([5] * 65, SamplingParams(max_tokens=1), "context length", id="prompt-alone-too-long"),
]


@pytest.mark.parametrize("prompt, params, match", BAD_REQUESTS)
def test_bad_request_is_rejected_with_its_reason(llm: LLM, prompt, params, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, params)
    with pytest.raises(ValueError, match=f"prompt 1: .*{match}"):
        llm.generate([GOOD_PROMPT, prompt], [GOOD, params])
    assert_idle(llm)


def test_request_beyond_cache_capacity(big_context_llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"= 100 exceeds the KV cache capacity of 96 tokens"):
        big_context_llm.engine.add_request([5] * 80, SamplingParams(max_tokens=20))
    [out] = big_context_llm.generate([[5] * 80], SamplingParams(max_tokens=16, temperature=0))
    assert len(out.token_ids) == 16  # exactly at capacity is fine
    assert_idle(big_context_llm)


@pytest.mark.parametrize("kwargs, field", [  # (the basic cases are in test_params.py)
    ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"top_p": -0.2}, "top_p"), ({"top_k": 2.5}, "top_k"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
])
def test_invalid_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_extreme_valid_seeds_run(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=3, seed=s) for s in (-(2**63), 2**64 - 1)]
    outs = llm.generate([GOOD_PROMPT] * 2, params)
    assert [len(o.token_ids) for o in outs] == [3, 3]
    assert_idle(llm)


def test_wrong_argument_types(llm: LLM) -> None:
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.engine.add_request(GOOD_PROMPT, {"max_tokens": 3})
    with pytest.raises(TypeError, match="list of strings or a list of token-id lists"):
        llm.generate(GOOD_PROMPT, GOOD)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([GOOD_PROMPT], [GOOD, GOOD])
    assert_idle(llm)


def test_bad_request_leaves_a_running_request_unaffected(llm: LLM, good_reference: list[int]) -> None:
    engine = llm.engine
    rid = engine.add_request(GOOD_PROMPT, GOOD)
    tokens = [t for d in engine.step() for t in d.token_ids]  # its prefill
    for prompt in ([], [300], [1] * 70):
        with pytest.raises(ValueError):
            engine.add_request(prompt, GOOD)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(GOOD_PROMPT, GOOD, request_id=rid)
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id == rid
            tokens += d.token_ids
    assert tokens == good_reference
    assert_idle(llm)
    # And a batch with a bad prompt in it raised earlier without touching the engine's state:
    [out] = llm.generate([GOOD_PROMPT], GOOD)
    assert out.token_ids == good_reference


def test_abort_running_request_frees_its_blocks_others_finish(llm: LLM, tiny_llama_dir: Path) -> None:
    engine = llm.engine
    prompts = [GOOD_PROMPT, [9] * 20, [3, 4, 5]]
    want = hf_greedy(tiny_llama_dir, prompts, GOOD.max_tokens)
    ids = [engine.add_request(p, GOOD) for p in prompts]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(3):
        for d in engine.step():
            got[d.request_id] += d.token_ids
    victim = ids[1]
    held = len(engine.blocks.tables[victim])
    free_before = engine.blocks.num_free
    delta = engine.abort(victim)
    assert delta is not None and delta.finish_reason == "abort" and delta.token_ids == []
    assert victim not in engine.blocks.tables
    assert engine.blocks.num_free == free_before + held
    assert engine.abort(victim) is None and engine.abort("no-such-request") is None
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id != victim
            got[d.request_id] += d.token_ids
    assert got[ids[0]] == want[0] and got[ids[2]] == want[2]
    assert got[victim] == want[1][:len(got[victim])] and 0 < len(got[victim]) < GOOD.max_tokens
    assert_idle(llm)


def test_error_in_the_middle_of_generate_leaks_nothing(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llm.engine.runner
    calls = {"n": 0}
    real_run = runner.run

    def failing_run(plan):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device failure")
        return real_run(plan)

    monkeypatch.setattr(runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        llm.generate([GOOD_PROMPT, [8] * 30], GOOD)
    assert_idle(llm)


# --- bad model directories -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_copy(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A fresh copy of the tiny model to break in one way."""
    root = tmp_path_factory.mktemp("broken")
    counter = iter(range(1000))

    def copy() -> Path:
        dst = root / f"m{next(counter)}"
        shutil.copytree(tiny_llama_dir, dst)
        return dst

    return copy


def load(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", num_blocks=4)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine(tmp_path / "no-such-model")


def test_directory_without_config(model_copy) -> None:
    model_dir = model_copy()
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(model_dir)


def test_corrupt_config_json(model_copy) -> None:
    model_dir = model_copy()
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match="config.json: corrupt JSON"):
        load(model_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(model_copy, damage: str) -> None:
    model_dir = model_copy()
    path = model_dir / "model.safetensors"
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightLoadError, match=r"model\.safetensors: corrupt or unreadable"):
        load(model_dir)


def test_no_weight_files(model_copy) -> None:
    model_dir = model_copy()
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors"):
        load(model_dir)


@pytest.mark.parametrize("dropped, named", [
    ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"),
    ("model.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.qkv_proj.weight"),
    ("model.layers.1.post_attention_layernorm.weight", "layers.1.post_attention_layernorm.weight"),
    ("lm_head.weight", "lm_head.weight"),  # untied: the head is a weight of its own
])
def test_missing_weight_tensor_is_named(model_copy, dropped: str, named: str) -> None:
    model_dir = model_copy()
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    assert dropped in tensors
    del tensors[dropped]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=f"missing weights for: .*{named}"):
        load(model_dir)


def test_weight_shape_mismatch_is_named(model_copy) -> None:
    model_dir = model_copy()
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"up_proj\.weight: checkpoint shape \(100, 64\)"):
        load(model_dir)


def test_missing_shard_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", max_shard_size="40KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (model_dir / shard).unlink()
    with pytest.raises(WeightLoadError, match=f"missing: .*{shard}"):
        load(model_dir)


@pytest.mark.parametrize("architectures, model_type", [
    (["GPT2LMHeadModel"], "gpt2"), ([], "falcon"),
])
def test_unsupported_architecture(model_copy, architectures: list[str], model_type: str) -> None:
    model_dir = model_copy()
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"], config["model_type"] = architectures, model_type
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=f"{architectures[0] if architectures else model_type}"
                       ".*not supported; supported: LlamaForCausalLM"):
        load(model_dir)


def test_unsupported_rope_scaling(model_copy) -> None:
    model_dir = model_copy()
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported"):
        load(model_dir)
