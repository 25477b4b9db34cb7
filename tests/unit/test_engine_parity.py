"""Greedy fp32 decoding is token-exact with transformers on the same weights.

Tiny random models cover each architecture variant the loader and model must get right (GQA, Qwen2
biases, Mistral, llama3 rope scaling, tied embeddings, sharded checkpoints); SmolLM2 is checked
against transformers loading the GGUF itself, so a bug in our conversion cannot hide on both sides.
Batches mix prompt lengths around the block size so packed prefill and paged decode cross block
boundaries.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem.engine import LLM, SamplingParams
from tests.reference import hf_greedy, hf_model_from_gguf, make_tiny_model

BLOCK_SIZE = 16
NEW_TOKENS = 32
# block_size - 1, block_size, block_size + 1 and a spread of others; 100 + 32 > 2 * 64, so the
# llama3 model runs far past its original_max_position_embeddings (64).
PROMPT_LENS = [15, 16, 17, 1, 3, 40, 64, 100]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
NUM_BLOCKS = 128  # room for every batch here without preemption (and no 1 GiB default cache)

SMOLLM2_TEXTS = [
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    ",
    "Water boils at",
    "Once upon a time, in a small village nestled between two snowy mountains, there lived an old "
    "clockmaker and his daughter. Every morning, before the sun rose over the valley, the clockmaker",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
    "Again:",
    "In 1969, Neil Armstrong",
]


def random_prompts(lens: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


PROMPTS = random_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity-models")
    sharded = make_tiny_model(root, "llama", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "the checkpoint should really be sharded"
    return {
        "llama-gqa": tiny_llama_dir,
        "qwen2-bias": tiny_qwen2_dir,
        "mistral": make_tiny_model(root, "mistral"),
        "llama3-rope": make_tiny_model(root, "llama", llama3_rope=True),
        "tied": make_tiny_model(root, "llama", tied=True),
        "sharded": sharded,
    }


_REFERENCE: dict[Path, list[list[int]]] = {}


def reference(model_dir: Path) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS (cached: several tests share a model)."""
    if model_dir not in _REFERENCE:
        _REFERENCE[model_dir] = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    return _REFERENCE[model_dir]


def assert_same_tokens(got: list[list[int]], want: list[list[int]], prompts: list[list[int]]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"prompt {i} ({len(prompts[i])} tokens) diverges at {_first_diff(g, w)}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "mistral", "llama3-rope", "tied", "sharded"])
def test_tiny_greedy_batch_matches_transformers(tiny_models: dict[str, Path], name: str) -> None:
    llm = LLM(tiny_models[name], dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    if name == "llama3-rope":
        assert llm.engine.model_config.rope_scaling.rope_type == "llama3"
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(o.finish_reason == "length" and len(o.token_ids) == NEW_TOKENS for o in outs)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert_same_tokens([o.token_ids for o in outs], reference(tiny_models[name]), PROMPTS)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "tied"])
def test_cuda_greedy_batch_matches_transformers_on_cuda(tiny_models: dict[str, Path], name: str) -> None:
    """The engine's torch path on a GPU, fp32, against transformers on the same GPU."""
    from tests.reference import hf_load

    llm = LLM(tiny_models[name], dtype="float32", device="cuda", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    outs = llm.generate(PROMPTS, GREEDY)
    want = hf_greedy(hf_load(tiny_models[name]).to("cuda"), PROMPTS, NEW_TOKENS)
    assert_same_tokens([o.token_ids for o in outs], want, PROMPTS)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_llama3_scaling_changes_the_reference(tiny_models: dict[str, Path]) -> None:
    """Same weights without the rope scaling decode differently on long prompts, so the parity test
    above would catch an engine that ignored the scaling."""
    scaled, plain = reference(tiny_models["llama3-rope"]), reference(tiny_models["llama-gqa"])
    long_prompts = [i for i, n in enumerate(PROMPT_LENS) if n >= 64]
    assert any(scaled[i] != plain[i] for i in long_prompts)


def test_parity_under_memory_pressure_with_preemption(tiny_models: dict[str, Path]) -> None:
    """Too few blocks for the whole batch: requests are preempted and recomputed, tokens unchanged."""
    model_dir = tiny_models["llama-gqa"]
    # The longest request needs ceil(132 / 16) = 9 blocks; the batch needs 37 at its peak.
    llm = LLM(model_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=12)
    scheduler = llm.engine.scheduler
    preempted: list[str] = []
    schedule = scheduler.schedule

    def spy():
        plan = schedule()
        if plan is not None:
            preempted.extend(s.request_id for s in plan.preempted)
        return plan

    scheduler.schedule = spy
    outs = llm.generate(PROMPTS, GREEDY)
    assert len(preempted) >= 2, "the batch should not fit: preemption must happen"
    assert_same_tokens([o.token_ids for o in outs], reference(model_dir), PROMPTS)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert not llm.engine.blocks.tables and not scheduler.has_work()


def test_prompts_one_at_a_time_match_the_batch_reference(tiny_models: dict[str, Path]) -> None:
    """Decode steps whose batch shrinks and grows (requests join mid-flight) stay exact."""
    model_dir = tiny_models["qwen2-bias"]
    llm = LLM(model_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    engine = llm.engine
    want = reference(model_dir)
    ids = {}
    deltas: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):  # a new request every 3 steps
        ids[engine.add_request(prompt, GREEDY)] = i
        for _ in range(3):
            for d in engine.step():
                deltas.setdefault(d.request_id, []).extend(d.token_ids)
    while engine.has_unfinished():
        for d in engine.step():
            deltas.setdefault(d.request_id, []).extend(d.token_ids)
    got = [None] * len(PROMPTS)
    for rid, i in ids.items():
        got[i] = deltas[rid]
    assert_same_tokens(got, want, PROMPTS)
    assert engine.blocks.num_free == engine.blocks.num_blocks


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_dir: Path) -> LLM:
    return LLM(smollm2_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_fp32: LLM) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, transformers' greedy tokens from the GGUF itself)."""
    prompts = [smollm2_fp32.tokenizer.encode(t) for t in SMOLLM2_TEXTS]
    return prompts, hf_greedy(hf_model_from_gguf(), prompts, NEW_TOKENS)


def test_smollm2_greedy_matches_transformers_gguf(smollm2_fp32: LLM, smollm2_reference) -> None:
    prompts, want = smollm2_reference
    lens = sorted(len(p) for p in prompts)
    assert lens[0] <= 2 and lens[-1] > 2 * BLOCK_SIZE  # varied: one block to several
    outs = smollm2_fp32.generate(prompts, GREEDY)
    assert_same_tokens([o.token_ids for o in outs], want, prompts)
    assert "Paris" in outs[0].text
    assert outs[0].text == smollm2_fp32.tokenizer.decode(outs[0].token_ids)


def test_smollm2_chunked_prefill_matches_transformers_gguf(smollm2_dir: Path, smollm2_reference) -> None:
    """Chunks of 19 tokens: the longer prompts span several steps, beside running decodes."""
    prompts, want = smollm2_reference
    llm = LLM(smollm2_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
              chunked_prefill=True, max_num_batched_tokens=19, max_num_seqs=8)
    outs = llm.generate(prompts, GREEDY)
    assert_same_tokens([o.token_ids for o in outs], want, prompts)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_smollm2_bf16_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    llm = LLM(smollm2_dir, dtype="bfloat16", block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    [out] = llm.generate(["The capital of France is"], SamplingParams(max_tokens=6, temperature=0))
    assert "Paris" in out.text, out.text
