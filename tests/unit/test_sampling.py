"""Sampling and stopping: per-request seeded RNG, top-k / top-p filtering, logprobs, and the stop
conditions (stop token ids, EOS, max_tokens, stop strings).

Filtering and logprobs are checked against transformers' logits for the same prefixes; the sampler
itself is also checked on crafted logits against the exact renormalised distribution.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from tandem.engine import LLM, SamplingParams
from tandem.engine.sampler import sample
from tandem.engine.sequence import Sequence, make_generator
from tandem.engine.tokenizer import DetokenizerState
from tests.reference import hf_greedy, hf_load

BLOCK_SIZE = 16


def random_prompts(lens: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lens]


PROMPTS = random_prompts([5, 9, 13, 20, 31], seed=1)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_k=60, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(tiny_llama_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=64)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: Path):
    return hf_load(tiny_llama_dir)


@pytest.fixture(scope="module")
def greedy_refs(hf) -> list[list[int]]:
    """transformers' greedy continuations (48 tokens) of PROMPTS."""
    return hf_greedy(hf, PROMPTS, 48)


@torch.no_grad()
def hf_step_logits(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' logits for every generated position: row i predicts output[i]."""
    ids = torch.tensor([prompt + output])
    logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) + len(output) - 1]


# --- seeded reproducibility ------------------------------------------------------------------------

def test_seeded_request_same_alone_and_in_any_batch(llm: LLM) -> None:
    prompt = PROMPTS[2]
    [alone] = llm.generate([prompt], SEEDED)
    others = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=1.3, top_k=3),  # unseeded
        SamplingParams(max_tokens=24, temperature=0.9, top_k=60, top_p=0.95, seed=99, ignore_eos=True),
    ]
    batch = llm.generate([PROMPTS[0], PROMPTS[1], prompt, PROMPTS[3], PROMPTS[4]],
                         [others[0], others[1], SEEDED, others[2], others[3]])
    assert batch[2].token_ids == alone.token_ids
    # Same prompt, same seed as another request in the same batch: also identical.
    twins = llm.generate([prompt, PROMPTS[0], prompt], [SEEDED, others[1], SEEDED])
    assert twins[0].token_ids == twins[2].token_ids == alone.token_ids


def test_seeded_request_joining_mid_flight_and_preempted_is_unchanged(tiny_llama_dir: Path, llm: LLM) -> None:
    [alone] = llm.generate([PROMPTS[1]], SEEDED)
    small = LLM(tiny_llama_dir, dtype="float32", block_size=4, num_blocks=14)
    engine = small.engine
    filler = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    for p in PROMPTS[:3]:
        engine.add_request(p, filler)
    engine.step()
    engine.step()
    rid = engine.add_request(PROMPTS[1], SEEDED)  # arrives last: the first preemption victim
    seq = engine.scheduler.find(rid)
    tokens: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id == rid:
                tokens.extend(delta.token_ids)
    assert seq.num_preemptions > 0, "the seeded request should have been preempted and recomputed"
    assert tokens == alone.token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_different_seeds_differ(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    unseeded = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[0]] * 6, params + [unseeded, unseeded])
    tokens = [tuple(o.token_ids) for o in outs]
    assert len(set(tokens)) == len(tokens), tokens


# --- filtering against transformers' distribution ------------------------------------------------

def test_top_k_tokens_are_within_transformers_top_k(llm: LLM, hf) -> None:
    k = 4
    params = [SamplingParams(max_tokens=24, temperature=1.5, top_k=k, seed=s, ignore_eos=True)
              for s in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params)
    not_argmax = 0
    for prompt, out in zip(PROMPTS, outs):
        logits = hf_step_logits(hf, prompt, out.token_ids)
        kth = logits.topk(k, dim=-1).values[:, -1]
        chosen = logits.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert bool((chosen >= kth - 1e-5).all()), f"token outside the top-{k}: {out.token_ids}"
        not_argmax += int((logits.argmax(-1) != torch.tensor(out.token_ids)).sum())
    assert not_argmax > 20  # it really sampled, rather than decoding greedily


def test_top_p_tokens_are_within_transformers_nucleus(llm: LLM, hf) -> None:
    top_p, temperature = 0.3, 0.7
    params = [SamplingParams(max_tokens=24, temperature=temperature, top_p=top_p, seed=10 + s,
                             ignore_eos=True) for s in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params)
    not_argmax = 0
    for prompt, out in zip(PROMPTS, outs):
        probs = torch.softmax(hf_step_logits(hf, prompt, out.token_ids) / temperature, dim=-1)
        chosen = probs.gather(1, torch.tensor(out.token_ids)[:, None])
        # Mass of the tokens ranked strictly above the chosen one must stay below top_p.
        mass_before = (probs * (probs > chosen)).sum(-1)
        assert bool((mass_before < top_p + 1e-5).all()), f"token outside the nucleus: {out.token_ids}"
        not_argmax += int((probs.argmax(-1) != torch.tensor(out.token_ids)).sum())
    assert not_argmax > 20


# --- the sampler on crafted logits ----------------------------------------------------------------

PROBS = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.005, 0.005])
PERM = torch.tensor([7, 2, 11, 0, 5, 9, 3, 10, 1, 8, 4, 6])  # token PERM[i] has probability PROBS[i]
DRAWS = 2000


def crafted_logits() -> torch.Tensor:
    logits = torch.empty(len(PROBS))
    logits[PERM] = PROBS.log() + 3.0  # an offset: softmax must not care
    return logits


def expected(keep: int, weights: torch.Tensor = PROBS) -> dict[int, float]:
    """The `keep` most likely tokens with their renormalised probabilities."""
    kept = weights[:keep] / weights[:keep].sum()
    return {int(PERM[i]): float(kept[i]) for i in range(keep)}


def draw(params: SamplingParams, logits: torch.Tensor, n: int = DRAWS) -> Counter:
    """n independent requests (own RNG each, fixed seeds) sampled from the same logits row."""
    seqs = [Sequence(f"r{i}", [0], 1, params, make_generator(params, i), DetokenizerState(0, 1))
            for i in range(n)]
    tokens = sample(logits.expand(n, -1).clone(), seqs).tokens
    return Counter(tokens)


def assert_distribution(counts: Counter, want: dict[int, float]) -> None:
    assert set(counts) <= set(want), f"tokens outside the allowed set: {set(counts) - set(want)}"
    n = sum(counts.values())
    for token, p in want.items():
        tolerance = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(counts[token] / n - p) <= tolerance, (token, counts[token] / n, p)


@pytest.mark.parametrize("params, want", [
    (SamplingParams(top_k=3), expected(3)),
    (SamplingParams(top_k=1), expected(1)),
    # sorted mass before each token: 0, .30, .50, .65 -> the fourth is the first beyond 0.6
    (SamplingParams(top_p=0.6), expected(3)),
    (SamplingParams(top_p=0.5), expected(2)),
    (SamplingParams(top_p=0.01), expected(1)),
    # top-k first, then the nucleus of the renormalised top-k: .46, .31 -> mass .77 >= .5
    (SamplingParams(top_k=4, top_p=0.5), expected(2)),
    (SamplingParams(top_k=0, top_p=1.0), expected(len(PROBS))),
    (SamplingParams(temperature=0.5), expected(len(PROBS), PROBS**2)),
    (SamplingParams(temperature=2.0, top_k=3), expected(3, PROBS.sqrt())),
], ids=["k3", "k1", "p.6", "p.5", "p.01", "k4p.5", "none", "t.5", "t2k3"])
def test_sampler_matches_renormalised_distribution(params: SamplingParams, want: dict[int, float]) -> None:
    assert_distribution(draw(params, crafted_logits()), want)


def test_sampler_rows_are_independent_in_a_mixed_batch() -> None:
    """Rows with different params and differently permuted logits never borrow each other's filter."""
    base = crafted_logits()
    shifted = base.roll(5)  # token t here has base[t - 5]'s logit
    rows = [
        (SamplingParams(temperature=0), base, {int(PERM[0]): 1.0}),
        (SamplingParams(top_k=2), shifted, {(int(PERM[i]) + 5) % 12: p for i, p in enumerate([0.6, 0.4])}),
        (SamplingParams(top_p=0.6), base, expected(3)),
        (SamplingParams(), shifted, {(t + 5) % 12: p for t, p in expected(12).items()}),
    ]
    n = 600
    seqs, logits = [], []
    for r, (params, row, _) in enumerate(rows):
        for i in range(n):
            seqs.append(Sequence(f"{r}-{i}", [0], 1, params, make_generator(params, 1000 * r + i),
                                 DetokenizerState(0, 1)))
            logits.append(row)
    tokens, logprobs, _ = sample(torch.stack(logits), seqs)
    assert logprobs is None
    for r, (_, _, want) in enumerate(rows):
        assert_distribution(Counter(tokens[r * n:(r + 1) * n]), want)


# --- logprobs ---------------------------------------------------------------------------------------

def test_logprobs_equal_transformers_log_softmax(llm: LLM, hf) -> None:
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=5, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=20, temperature=1.2, seed=6, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True),  # none asked
    ]
    outs = llm.generate(PROMPTS[:4], params)
    assert outs[3].logprobs is None
    for prompt, out in zip(PROMPTS[:3], outs[:3]):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 20
        # Untempered: the model's own distribution, whatever the sampling temperature.
        want = torch.log_softmax(hf_step_logits(hf, prompt, out.token_ids), dim=-1)
        want = want.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-4)


# --- stop conditions -------------------------------------------------------------------------------

def first_new_token(tokens: list[int], start: int = 3) -> int:
    """Index of the first token (from `start`) that did not occur earlier in `tokens`."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids_end_with_stop(llm: LLM, greedy_refs: list[list[int]]) -> None:
    ref = greedy_refs[0]
    k = first_new_token(ref)
    params = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ref[k], 255], ignore_eos=True)
    [out] = llm.generate([PROMPTS[0]], params)
    if 255 in ref[:k]:
        pytest.fail("precondition: pick another extra stop id")
    assert out.token_ids == ref[:k + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_ends_with_length(llm: LLM, greedy_refs: list[list[int]]) -> None:
    eos = llm.engine.model_config.eos_token_ids
    ref = greedy_refs[1]
    assert not set(ref[:5]) & set(eos)  # precondition: EOS does not interfere
    [out] = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=0))
    assert out.token_ids == ref[:5] and out.finish_reason == "length"


def _with_eos(src: Path, dst: Path, config_eos, generation_eos) -> Path:
    shutil.copytree(src, dst)
    for name, eos in (("config.json", config_eos), ("generation_config.json", generation_eos)):
        path = dst / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["eos_token_id"] = eos
        path.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_eos_ends_with_stop_unless_ignored(tiny_llama_dir: Path, tmp_path: Path, where: str,
                                           greedy_refs: list[list[int]]) -> None:
    ref = greedy_refs[2]
    k = first_new_token(ref)
    eos = ref[k]
    # EOS declared in config.json only, or added by generation_config.json (both count).
    model_dir = _with_eos(tiny_llama_dir, tmp_path / "m", eos if where == "config" else 2,
                          eos if where == "generation_config" else 2)
    llm = LLM(model_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=16)
    stopped, ignored = llm.generate([PROMPTS[2]] * 2, [
        SamplingParams(max_tokens=40, temperature=0),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
    ])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[:k + 1] and stopped.token_ids[-1] == eos
    assert ignored.finish_reason == "length" and ignored.token_ids == ref[:40]


def _ascii_pair(tokens: list[int]) -> int | None:
    """Index of the first two adjacent printable-ASCII tokens (bytes) in `tokens`."""
    printable = set(range(0x21, 0x7f))
    return next((i for i in range(1, len(tokens) - 1)
                 if tokens[i] in printable and tokens[i + 1] in printable), None)


def run_streaming(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    """Run one request through the engine's step loop; returns tokens, streamed text, finish reason."""
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    tokens, text, reason = [], "", None
    while reason is None:
        for delta in engine.step():
            if delta.request_id == rid:
                tokens += delta.token_ids
                text += delta.text
                reason = delta.finish_reason
    return tokens, text, reason


def test_stop_strings_truncate_text_and_stream_consistently(llm: LLM, tiny_llama_dir: Path,
                                                            greedy_refs: list[list[int]]) -> None:
    """With the byte tokenizer (token id == byte), a stop string of two ASCII bytes spans two tokens."""
    decoder = HFTokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    found = [(p, ref, _ascii_pair(ref)) for p, ref in zip(PROMPTS, greedy_refs)]
    prompt, ref, k = next((p, r, k) for p, r, k in found if k is not None)
    stop = bytes(ref[k:k + 2]).decode()
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=["\x00\x01never", stop])
    tokens, streamed, reason = run_streaming(llm, prompt, params)
    assert reason == "stop"
    assert tokens == ref[:k + 2]  # the token completing the stop string is the last one
    want_text = decoder.decode(ref[:k], skip_special_tokens=True)
    assert streamed == want_text, "streamed deltas must not contain any part of the stop string"
    [out] = llm.generate([prompt], params)
    assert out.text == want_text and out.finish_reason == "stop" and out.token_ids == ref[:k + 2]


def test_unmatched_stop_strings_still_stream_all_text(llm: LLM, tiny_llama_dir: Path,
                                                      greedy_refs: list[list[int]]) -> None:
    decoder = HFTokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=["\x00\x01\x02never"])
    tokens, streamed, reason = run_streaming(llm, PROMPTS[3], params)
    assert reason == "length" and tokens == greedy_refs[3]
    assert streamed == decoder.decode(greedy_refs[3], skip_special_tokens=True).rstrip("\ufffd")


def test_top_logprobs_are_transformers_most_likely_tokens(llm: LLM, hf) -> None:
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5),
        SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True, logprobs=True, top_logprobs=20),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True),  # chosen only
    ]
    outs = llm.generate(PROMPTS[:3], params)
    assert outs[2].top_logprobs is None and outs[2].logprobs is not None
    for prompt, out, p in zip(PROMPTS[:2], outs[:2], params[:2]):
        assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids)
        want = torch.log_softmax(hf_step_logits(hf, prompt, out.token_ids), dim=-1)
        values, ids = want.topk(p.top_logprobs, dim=-1)
        for step, top in enumerate(out.top_logprobs):
            got_values = torch.tensor([t.logprob for t in top])
            torch.testing.assert_close(got_values, values[step], rtol=0, atol=1e-4)
            # Ids agree except where two logprobs tie within the tolerance.
            for t, want_id, want_value in zip(top, ids[step].tolist(), values[step].tolist()):
                assert t.token_id == want_id or abs(float(want[step, t.token_id]) - want_value) < 1e-4
        if p.greedy:  # the chosen token is the most likely one
            assert [top[0].token_id for top in out.top_logprobs] == out.token_ids


def test_top_logprobs_need_logprobs_and_stop_at_20() -> None:
    with pytest.raises(ValueError, match="top_logprobs: needs logprobs=True"):
        SamplingParams(top_logprobs=3)
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)
