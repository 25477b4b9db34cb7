"""``LLM``: the colocated, in-process engine behind one call. Also the baseline the cluster is
measured against."""
from __future__ import annotations

import os
from collections.abc import Sequence as Seq

from tandem.engine.engine import DEFAULT_KV_CACHE_BYTES, Engine, EngineConfig
from tandem.engine.outputs import Completion
from tandem.engine.parallel import Parallelism
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig


def resolve_model_path(model: str | os.PathLike):
    from tandem.engine.prepare import resolve_model  # a name such as "smollm2" -> its prepared directory

    return resolve_model(model)


class LLM:
    """Generate completions for a batch of prompts with continuous batching over a paged KV cache."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 128,
        device: str = "cpu",
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        tp: int = 1,
        pp: int = 1,
        chunked_prefill: bool = False,
        long_prefill_tokens: int | None = None,
    ) -> None:
        """``tp``/``pp`` above 1 run the model on tp x pp local worker processes (tensor- and
        pipeline-parallel shards; ``close`` stops them). ``chunked_prefill``: every step mixes
        the running decodes with prompt chunks, ``max_num_batched_tokens`` in all, one prompt's
        chunk at most ``long_prefill_tokens`` (engine/scheduler.py)."""
        config = EngineConfig(
            dtype=dtype, device=device, block_size=block_size, num_blocks=num_blocks,
            kv_cache_bytes=kv_cache_bytes, max_model_len=max_model_len,
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      chunked_prefill=chunked_prefill,
                                      long_prefill_tokens=long_prefill_tokens),
            parallelism=Parallelism(tp, pp),
        )
        self.model_dir = resolve_model_path(model)
        self.engine = Engine(self.model_dir, config)

    def close(self) -> None:
        """Stop the worker processes of a parallel LLM (nothing to do for tp = pp = 1)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Seq[str] | Seq[list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion; results in prompt order.

        All prompts are validated before any runs, so a bad one raises (naming its index) without
        touching the engine's state.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        params_list = _broadcast(params, len(prompts))
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                seqs.append(self.engine.new_sequence(prompt, p))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
        for seq in seqs:
            self.engine.scheduler.add(seq)
        try:
            while any(s.finish_reason is None for s in seqs):
                self.engine.step()
        finally:
            for seq in seqs:  # on error or interrupt: leave nothing running, leak no block
                if seq.finish_reason is None:
                    self.engine.abort(seq.request_id)
        return [_completion(s) for s in seqs]


    def chat(self, conversations, params: SamplingParams | Seq[SamplingParams] | None = None) -> list[Completion]:
        """Reply to one conversation (a list of ``{"role", "content"}`` messages) or to a list of
        them, each rendered with the model's chat template (as ``tandem serve --http`` and
        ``Client.chat`` do); one completion per conversation."""
        from tandem.engine.prepare import render_chat

        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([render_chat(self.model_dir, messages) for messages in conversations], params)


def _broadcast(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params


def _completion(seq) -> Completion:
    return Completion(
        request_id=seq.request_id,
        token_ids=seq.output_token_ids,
        text=seq.text,
        finish_reason=seq.finish_reason,
        logprobs=seq.logprobs if seq.params.logprobs else None,
        top_logprobs=seq.top_logprobs if seq.params.top_logprobs else None,
        prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
        error=seq.error,
    )
