"""Tensor- and pipeline-parallel engines (local worker processes, gloo) against transformers on the
same weights: greedy fp32 outputs equal the reference's (or first differ at a near-tie, which the
test checks), seeded sampling equals a single-worker engine's, every block comes back, and a worker
that dies fails the step with an error naming it instead of hanging."""
from __future__ import annotations

import os
import signal

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.worker import WorkerFailed
from tests.reference import assert_greedy_close, hf_greedy, hf_load, make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), [200, 3, 77] * 7]
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """3 layers (pp=2 splits them unevenly), 4 query and 2 KV heads (tp=4 replicates KV heads);
    one untied Llama, one tied Qwen2 (q/k/v biases; pp=2 puts embedding and head on two stages)."""
    root = tmp_path_factory.mktemp("parallel-models")
    return {"llama": make_tiny_model(root, "llama", num_hidden_layers=3),
            "qwen2-tied": make_tiny_model(root, "qwen2", tied=True, num_hidden_layers=3)}


@pytest.fixture(scope="module")
def references(models):
    return {name: (hf_load(path), hf_greedy(path, PROMPTS, NEW_TOKENS)) for name, path in models.items()}


@pytest.mark.parametrize("model, tp, pp", [
    ("llama", 2, 1), ("llama", 2, 2), ("qwen2-tied", 1, 2), ("qwen2-tied", 4, 1),
], ids=["llama-tp2", "llama-tp2-pp2", "qwen2-tied-pp2", "qwen2-tied-tp4-replicated-kv"])
def test_greedy_outputs_match_transformers(models, references, model, tp, pp):
    reference, wanted = references[model]
    with LLM(models[model], tp=tp, pp=pp, dtype="float32", num_blocks=64) as llm:
        outputs = llm.generate(PROMPTS, GREEDY)
        assert llm.engine.num_free_blocks == 64
    for prompt, out, want in zip(PROMPTS, outputs, wanted):
        assert len(out.token_ids) == NEW_TOKENS
        assert_greedy_close(reference, prompt, out.token_ids, want)


def test_a_prefill_large_enough_goes_through_the_stages_as_micro_batches(models, references):
    from tandem.engine.step_inputs import StepInputs, split_inputs
    from tandem.engine.worker import MICRO_BATCH_MIN_TOKENS

    prompts = [[(7 * i + j) % 250 + 3 for j in range(150)] for i in range(3)]
    step = StepInputs("prefill", [t for p in prompts for t in p], [150] * 3, [[0]] * 3)
    assert len(split_inputs(step, 2, MICRO_BATCH_MIN_TOKENS)) == 2  # so the stages overlap
    reference, _ = references["llama"]
    wanted = hf_greedy(reference, prompts, 6)
    with LLM(models["llama"], pp=2, dtype="float32") as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    for prompt, out, want in zip(prompts, outputs, wanted):
        assert_greedy_close(reference, prompt, out.token_ids, want)


def test_a_greedy_step_brings_back_token_ids_not_logits(models):
    from tandem.engine.sampler import WorkerSampled

    with LLM(models["llama"], tp=2, dtype="float32") as llm:
        engine = llm.engine
        engine.add_request(PROMPTS[0], GREEDY)
        sampled = engine.runner.run(engine.scheduler.schedule())
        assert isinstance(sampled, WorkerSampled) and len(sampled.tokens) == 1
        engine.add_request(PROMPTS[1], SamplingParams(max_tokens=2, temperature=0, logprobs=True))
        assert engine.runner.run(engine.scheduler.schedule()).shape == (1, 256)  # logprobs need logits


def test_seeded_sampling_matches_a_single_worker(models):
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, top_p=0.9, seed=s)
              for s in range(len(PROMPTS))]
    single = LLM(models["llama"], dtype="float32").generate(PROMPTS, params)
    with LLM(models["llama"], tp=2, dtype="float32") as llm:
        parallel = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in parallel] == [o.token_ids for o in single]


def test_an_illegal_shape_is_refused_before_any_worker_starts(models):
    with pytest.raises(ValueError, match="tp=3 does not divide the 4 attention heads"):
        LLM(models["llama"], tp=3)
    with pytest.raises(ValueError, match="pp=4 exceeds the 3 layers"):
        LLM(models["llama"], pp=4)


def test_a_dead_worker_fails_the_step_naming_it_and_frees_every_block(models):
    with LLM(models["llama"], tp=2, dtype="float32", num_blocks=64) as llm:
        group = llm.engine.runner.group
        os.kill(group.procs[1].pid, signal.SIGKILL)
        group.procs[1].join(timeout=10)
        with pytest.raises(WorkerFailed, match="worker 1 of 2"):
            llm.generate(PROMPTS, GREEDY)
        assert llm.engine.num_free_blocks == 64
        assert not llm.engine.has_unfinished()
        with pytest.raises(WorkerFailed, match="failed earlier"):
            llm.generate(PROMPTS[:1], GREEDY)


def test_chunked_prefill_on_a_tp2_pp2_engine_matches_transformers(models, references):
    """Mixed steps (decodes beside prompt chunks with cached prefixes) through the workers."""
    reference, wanted = references["llama"]
    with LLM(models["llama"], tp=2, pp=2, dtype="float32", num_blocks=64, chunked_prefill=True,
             max_num_batched_tokens=8, max_num_seqs=3) as llm:
        outputs = llm.generate(PROMPTS, GREEDY)
        assert llm.engine.num_free_blocks == 64
    for prompt, out, want in zip(PROMPTS, outputs, wanted):
        assert_greedy_close(reference, prompt, out.token_ids, want)


def test_a_mixed_step_splits_into_micro_batches_with_its_chunk_lengths():
    from tandem.engine.step_inputs import StepInputs, split_inputs

    # two decodes, then chunks of 150 and 140 tokens after 10 and 0 cached tokens
    step = StepInputs("prefill", list(range(292)), [7, 9, 160, 140], [[0], [1], [2], [3]],
                      query_lens=[1, 1, 150, 140])
    first, second = split_inputs(step, 2, 128)
    assert first.query_lens == [1, 1, 150] and first.seq_lens == [7, 9, 160] and len(first.token_ids) == 152
    assert second.query_lens == [140] and second.seq_lens == [140] and second.token_ids == list(range(152, 292))


def test_pp2_decodes_two_batches_in_flight_with_the_references_outputs(models, references):
    """Requests of different lengths on a pp=2 engine: decode steps of two batches overlap in the
    stages (counted), requests finish at different steps and new ones join; greedy outputs match
    transformers, seeded ones a single worker, and every block comes back."""
    reference, _ = references["llama"]
    prompts = [[(11 * i + j) % 240 + 5 for j in range(4 + 3 * i)] for i in range(6)]
    lengths = [12, 5, 20, 9, 16, 7]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) if i % 2 == 0 else
              SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9, top_k=40, seed=i)
              for i, n in enumerate(lengths)]
    single = LLM(models["llama"], dtype="float32").generate(prompts, params)
    with LLM(models["llama"], pp=2, dtype="float32", num_blocks=64) as llm:
        engine = llm.engine
        for prompt, p in zip(prompts[:4], params[:4]):
            engine.add_request(prompt, p)
        outputs: dict[str, list[int]] = {}
        steps = 0
        while engine.has_unfinished():
            for delta in engine.step():
                outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            steps += 1
            if steps == 6:  # late arrivals join while both batches are in flight
                for prompt, p in zip(prompts[4:], params[4:]):
                    engine.add_request(prompt, p)
        assert engine.pipeline.num_overlapped >= 10 and engine.num_free_blocks == 64
    got = [outputs[rid] for rid in sorted(outputs, key=lambda r: int(r.split("-")[-1]))]
    for i, (prompt, tokens) in enumerate(zip(prompts, got)):
        assert len(tokens) == lengths[i]
        if i % 2 == 0:
            assert_greedy_close(reference, prompt, tokens, hf_greedy(reference, [prompt], lengths[i])[0])
        else:
            assert tokens == single[i].token_ids


def test_a_request_aborted_or_exported_mid_flight_leaves_the_others_exact(models, references):
    """Abort one request and export another while their steps are in flight on a pp=2 engine: the
    steps are collected first (their tokens still reported, in order), the export carries every
    token reported, and the rest decode on to transformers' tokens with every block back."""
    reference, _ = references["llama"]
    params = SamplingParams(max_tokens=14, ignore_eos=True, temperature=0)
    with LLM(models["llama"], pp=2, dtype="float32", num_blocks=64) as llm:
        engine = llm.engine
        rids = [engine.add_request(prompt, params) for prompt in PROMPTS + [[9, 8, 7, 6]]]
        outputs: dict[str, list[int]] = {rid: [] for rid in rids}

        def step():
            for delta in engine.step():
                outputs[delta.request_id].extend(delta.token_ids)
        for _ in range(10):  # until every request has a token and one batch's step is in flight
            step()
            if all(outputs[r] for r in rids) and engine.pipeline.in_flight:
                break
        ((plan, _),) = engine.pipeline.in_flight  # a step returns with the other batch's in flight
        aborted, exported = [s.request_id for s in plan.seqs]
        assert engine.abort(aborted).finish_reason == "abort"
        state = engine.export(exported).state
        assert not engine.pipeline.in_flight
        step()  # the tokens the abort and the export collected early
        assert state.token_ids[state.num_prompt_tokens:] == outputs[exported]
        engine.release(exported)
        while engine.has_unfinished():
            step()
        assert engine.num_free_blocks == 64
    for rid, prompt in zip(rids, PROMPTS + [[9, 8, 7, 6]]):
        if rid in (aborted, exported):
            continue
        assert len(outputs[rid]) == 14
        assert_greedy_close(reference, prompt, outputs[rid], hf_greedy(reference, [prompt], 14)[0])
