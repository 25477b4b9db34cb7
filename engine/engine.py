"""The in-process step loop: requests in, token deltas out. No Ray, no network.

    plan = scheduler.schedule()          # which requests run, prefill or decode
    logits = runner.run(plan)            # one model step over the paged KV cache
    tokens = sample(logits, plan.seqs)   # each request with its own RNG
    deltas = [append(seq, tok) ...]      # detokenize, check stop conditions, free finished

Every exit path (finish, abort, error) frees the request's blocks. Requests move between engines
through the hand-over API at the end (``engine/handover.py`` says who calls it and how).
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Callable

import msgspec
import torch

from tandem.engine import heap, hugepages
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import ModelConfig, load_config
from tandem.engine.handover import Export, RequestState, Snapshot
from tandem.engine.memory import CudaProbe, MemoryProbe, kv_budget_bytes, profile_memory
from tandem.engine.outputs import TokenDelta, TopLogprob
from tandem.engine.pacing import PacedRunner, StepPace
from tandem.engine.params import SamplingParams
from tandem.engine.parallel import Parallelism, check_parallelism, kv_head_range, layer_range
from tandem.engine.pipeline import DecodePipeline
from tandem.engine.runner import DTYPES, GroupRunner, ModelRunner, build_model, kv_cache_shape, resolve_dtype
from tandem.engine.sampler import sample, select_rows
from tandem.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from tandem.engine.sequence import Sequence, Status, make_generator, sequence_from, state_of
from tandem.engine.stopping import append_text, finish_reason
from tandem.engine.tokenizer import DetokenizerState, Tokenizer, detokenize_step
from tandem.engine.validation import prompt_token_ids, validate_request
from tandem.engine.worker import WorkerConfig, WorkerGroupFactory

DEFAULT_KV_CACHE_BYTES = 1 << 30


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as fit in kv_cache_bytes
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    scheduler: SchedulerConfig = SchedulerConfig()
    step_pace: StepPace | None = None  # steps last at least this latency model's time (engine/pacing.py)
    parallelism: Parallelism = Parallelism()  # tp x pp worker processes (engine/worker.py) when > 1
    worker_timeout_s: float = 60.0  # a parallel instance's bound on each collective and step
    # On a GPU, without num_blocks: the share of this engine's ``device_share`` of the device that
    # weights, activations and KV may fill together; the KV gets what the loaded weights and a
    # profiled largest step leave (engine/memory.py). None: ``kv_cache_bytes``.
    memory_fraction: float | None = None
    device_share: float = 1.0  # the fraction of a GPU Ray gave this engine
    # With pp > 1: decode as pp batches with a step of each in flight (engine/pipeline.py).
    pipeline_decode: bool = True


def context_limit(model: ModelConfig, requested: int | None) -> int:
    """Longest sequence the engine serves: the request, the model's positions, its window."""
    limits = [requested, model.max_position_embeddings, model.sliding_window]
    return min(x for x in limits if x)


class Engine:
    """A model, its paged KV cache, a scheduler and the step loop."""

    def __init__(self, model_dir: Path, config: EngineConfig = EngineConfig(),
                 kv_allocator: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 workers: WorkerGroupFactory | None = None, memory_probe: MemoryProbe | None = None) -> None:
        """``kv_allocator(shape, dtype)`` returns the zero-filled KV cache, e.g. in shared memory
        a same-node transport maps from other processes; default: zeros on the device (on CPU,
        on huge pages: ``engine.hugepages``). With ``config.parallelism`` above (1, 1) the engine
        is the controller of tp x pp workers that ``workers`` starts (default: local processes,
        ``engine/process_group.py``); it keeps the scheduler and blocks, they the model and KV.
        ``memory_probe`` reads the device for ``config.memory_fraction`` (default: CUDA's own
        accounting; a GPU engine sized so measures its memory once the model is loaded)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        self.config = config
        if config.device == "cpu":
            heap.keep_freed_memory()
        self.model_config: ModelConfig = load_config(model_dir)
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, config.device)
        check_parallelism(self.model_config, config.parallelism)
        self.max_model_len = context_limit(self.model_config, config.max_model_len)
        self._probe = memory_probe
        if self._measures_memory() and config.parallelism.world_size > 1:
            raise ValueError("memory_fraction on a GPU sizes one worker's cache from its own memory; "
                             "a tensor/pipeline-parallel instance needs num_blocks")
        # A measured engine learns its block count once its model is loaded (_load_model).
        self.blocks = None if self._measures_memory() else BlockManager(
            config.num_blocks or self._blocks_for_budget(), config.block_size)
        if config.parallelism.world_size > 1:
            self.runner = self._start_workers(model_dir, workers)
        else:
            self.runner = self._load_model(model_dir, kv_allocator)
        pace = config.step_pace
        self._step_runner = self.runner if pace is None else PacedRunner(self.runner, pace)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.pipeline = self._decode_pipeline()
        self._drained: list[TokenDelta] = []  # outputs of pipelined steps collected early
        self._exports: dict[str, Sequence] = {}  # exported: off the schedule, blocks kept
        self._reserved: set[str] = set()  # blocks reserved for a request being imported
        self.num_preemptions = 0  # requests preempted since the engine started
        self._ids = itertools.count()
        self._seeds = random.Random()

    def _decode_pipeline(self) -> DecodePipeline | None:
        """Pipelined decoding where it applies: pp > 1 stages, decode steps (not chunked ones)
        and no step pace (which times whole steps)."""
        config = self.config
        if (config.parallelism.pp < 2 or not config.pipeline_decode or config.step_pace is not None
                or config.scheduler.chunked_prefill or not config.scheduler.enable_decode):
            return None
        return DecodePipeline(self.runner, self.scheduler, config.parallelism.pp)

    def _measures_memory(self) -> bool:
        """Whether the KV capacity comes from the device's memory, measured after loading."""
        config = self.config
        return (config.memory_fraction is not None and config.num_blocks is None
                and (config.device != "cpu" or self._probe is not None))

    def _load_model(self, model_dir: Path, kv_allocator) -> ModelRunner:
        config = self.config
        model = build_model(self.model_config, model_dir, self.dtype, config.device, self.max_model_len)
        if self._measures_memory():
            self.blocks = BlockManager(self._blocks_for_budget(self._measured_kv_bytes(model)), config.block_size)
        shape = kv_cache_shape(self.model_config, self.blocks.num_blocks, config.block_size)
        if kv_allocator is None:
            kv_allocator = hugepages.zeros if config.device == "cpu" else (
                lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=config.device))
        return ModelRunner(model, kv_allocator(tuple(shape), self.dtype), config.block_size, self.blocks.tables)

    def _start_workers(self, model_dir: Path, workers: WorkerGroupFactory | None) -> GroupRunner:
        config = self.config
        dtype_name = next(name for name, dtype in DTYPES.items() if dtype == self.dtype)
        worker_config = WorkerConfig(
            model_dir=str(model_dir), dtype=dtype_name, device=config.device, block_size=config.block_size,
            num_blocks=self.blocks.num_blocks, max_model_len=self.max_model_len,
            parallelism=config.parallelism, timeout_s=config.worker_timeout_s)
        if workers is None:
            from tandem.engine.process_group import ProcessWorkerGroup

            workers = ProcessWorkerGroup
        return GroupRunner(workers(worker_config), self.blocks.tables)

    def _blocks_for_budget(self, kv_bytes: int | None = None) -> int:
        """Blocks whose KV fits ``kv_bytes`` (default ``kv_cache_bytes``) on every worker (the
        largest shard decides)."""
        c, par = self.model_config, self.config.parallelism
        per_block = self._kv_block_bytes(len(layer_range(c.num_layers, par.pp, 0)),
                                         len(kv_head_range(c.num_kv_heads, par.tp, 0)))
        return max(1, (kv_bytes or self.config.kv_cache_bytes) // per_block)

    def _measured_kv_bytes(self, model) -> int:
        """What ``memory_fraction`` of the device leaves for KV once ``model`` is loaded."""
        config = self.config
        profile = profile_memory(
            model, lambda n: kv_cache_shape(self.model_config, n, config.block_size), self.dtype,
            config.device, config.block_size, config.scheduler.max_num_batched_tokens,
            self._probe or CudaProbe(config.device))
        return kv_budget_bytes(config.memory_fraction, config.device_share, profile)

    def _kv_block_bytes(self, layers: int, kv_heads: int) -> int:
        return 2 * layers * self.config.block_size * kv_heads * self.model_config.head_dim * self.dtype.itemsize

    def close(self) -> None:
        """Stop a parallel instance's workers (a single-worker engine holds nothing to stop)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self.max_model_len)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem if the request can never run here."""
        validate_request(
            prompt_ids, params, vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            capacity_tokens=self.blocks.num_blocks * self.blocks.block_size,
            has_tokenizer=self.tokenizer is not None,
        )

    def new_sequence(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> Sequence:
        """Tokenize and validate a request without scheduling it."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        self.validate(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        generator = make_generator(params, self._seeds.getrandbits(63))
        return Sequence(rid, ids, len(ids), params, generator, DetokenizerState.after_prompt(len(ids)))

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        seq = self.new_sequence(prompt, params, request_id)
        self._check_unused(seq.request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def _check_unused(self, request_id: str) -> None:
        if self._holds(request_id) or self.scheduler.find(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")

    def abort(self, request_id: str) -> TokenDelta | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown/finished."""
        self._settle(request_id)
        seq = self.scheduler.find(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self.scheduler.finish(seq)
        return TokenDelta(request_id, [], "", seq.num_output_tokens, finish_reason="abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._drained)

    def request_ids(self) -> list[str]:
        """Every request this engine holds: scheduled (waiting or running), exported or reserved."""
        return [*(s.request_id for s in (*self.scheduler.waiting, *self.scheduler.running)),
                *self._exports, *self._reserved]

    def stats(self) -> dict[str, int]:
        return {"num_blocks": self.blocks.num_blocks, "free_blocks": self.blocks.num_free,
                "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "waiting_tokens": self.scheduler.tokens_to_prefill(),
                "held": len(self._exports) + len(self._reserved), "preemptions": self.num_preemptions,
                "block_bytes": self.block_bytes}

    @property
    def block_bytes(self) -> int:
        """Bytes of KV one block holds, over the whole model."""
        return self._kv_block_bytes(self.model_config.num_layers, self.model_config.num_kv_heads)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_scheduled(self) -> int:
        """Requests on the schedule: running or waiting (to be prefilled or recomputed)."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    # -- the step loop --------------------------------------------------------------------------

    def step(self) -> list[TokenDelta]:
        return self.run_step()[1]

    def run_step(self) -> tuple[StepPlan | None, list[TokenDelta]]:
        """One scheduled model step; returns the plan too, for callers that act on its requests.
        (With pipelined decoding: the oldest step in flight, after filling the pipeline.)"""
        if self._drained:  # outputs of steps collected before a hand-over or an abort
            deltas, self._drained = self._drained, []
            return None, deltas
        if self.pipeline is not None and self.pipeline.applies():
            plan, deltas, preempted = self.pipeline.step(self._outputs)
            self.num_preemptions += preempted
            return plan, deltas
        plan = self.scheduler.schedule()
        if plan is None:
            return None, []
        self.num_preemptions += len(plan.preempted)
        if not plan.seqs:  # every request was preempted (blocks held elsewhere): nothing to run
            return plan, []
        return plan, self._outputs(plan, self._step_runner.run(plan))

    def _settle(self, request_id: str) -> None:
        """Collect the pipelined steps in flight if ``request_id`` is in one (its outputs are
        returned by the next step), so it can be handed over or aborted between its tokens."""
        if self.pipeline is not None and request_id in self.pipeline.busy:
            self._drained += self.pipeline.drain(self._outputs)

    def _outputs(self, plan: StepPlan, logits) -> list[TokenDelta]:
        """A step's sampled tokens, appended to their requests."""
        rows = plan.sampling_rows()
        if not rows:  # only mid-prompt chunks: nothing to sample yet
            return []
        seqs = [plan.seqs[i] for i in rows]
        sampled = sample(select_rows(logits, rows, len(plan.seqs)), seqs)
        return [
            self._append_or_fail(seq, tok, None if sampled.logprobs is None else sampled.logprobs[i],
                                 None if sampled.top is None else sampled.top[i])
            for i, (seq, tok) in enumerate(zip(seqs, sampled.tokens))
        ]

    def _append_or_fail(self, seq: Sequence, token: int, logprob: float | None,
                        top: list[TopLogprob] | None = None) -> TokenDelta:
        """``append_token``, with a failure in one request's own handling (its stop strings, its
        detokenization) failing that request alone: finished with the error, its blocks freed."""
        index = seq.num_output_tokens
        try:
            return self.append_token(seq, token, logprob, top)
        except Exception as exc:
            error = (f"request {seq.request_id!r} failed handling its output token {index}: "
                     f"{type(exc).__name__}: {exc}")
            del seq.token_ids[seq.num_prompt_tokens + index:]  # the failed token was never reported
            seq.finish_reason, seq.error = "error", error
            self.scheduler.finish(seq)
            return TokenDelta(seq.request_id, [], "", index, finish_reason="error", error=error)

    def append_token(self, seq: Sequence, token: int, logprob: float | None,
                     top: list[TopLogprob] | None = None) -> TokenDelta:
        """Record a sampled token; finish (and free) the request if a stop condition holds."""
        seq.token_ids.append(token)
        if seq.params.logprobs and logprob is not None:
            seq.logprobs.append(logprob)
        if seq.params.top_logprobs and top is not None:
            seq.top_logprobs.append(top)
        text = detokenize_step(self.tokenizer, seq.token_ids, seq.detok) if self.tokenizer else ""
        reason = finish_reason(seq, token, self.model_config.eos_token_ids, self.max_model_len)
        text, stopped = append_text(seq, text, final=reason is not None)
        reason = "stop" if stopped else reason
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)
        return TokenDelta(seq.request_id, [token], text, seq.num_output_tokens - 1,
                          [logprob] if seq.params.logprobs and logprob is not None else None,
                          finish_reason=reason,
                          top_logprobs=[top] if seq.params.top_logprobs and top is not None else None)

    # -- hand-over: requests moving between engines (engine/handover.py) -------------------------

    @property
    def kv_cache(self) -> torch.Tensor:
        """``[layers, 2, blocks, block_size, kv_heads, head_dim]``: transports copy blocks of it."""
        return self.runner.kv_cache

    def export(self, request_id: str) -> Export:
        """Stop scheduling a running request and keep its blocks until ``release`` (or ``resume``)."""
        self._settle(request_id)
        seq = self.scheduler.find(request_id)
        if seq is None or seq.status is not Status.RUNNING:
            raise ValueError(f"request {request_id!r} is not running here: only a running request "
                             "exports")
        self.scheduler.detach(seq)
        self._exports[request_id] = seq
        return Export(state_of(seq), list(self.blocks.tables[request_id]))

    def snapshot(self, request_id: str, first_block: int) -> Snapshot:
        """A running request's KV blocks that are full (never written again), from its
        ``first_block``-th on, each kept alive by an extra reference until ``unshare``: a
        migration copies them while the request keeps decoding. ValueError if it is not running."""
        seq = self.scheduler.find(request_id)
        if seq is None or seq.status is not Status.RUNNING:
            raise ValueError(f"request {request_id!r} is not running here: only a running request "
                             "is copied live")
        num_full = (seq.num_tokens - 1) // self.blocks.block_size  # all but the newest token have KV
        block_ids = list(self.blocks.tables[request_id][first_block:num_full])
        self.blocks.share(block_ids)
        return Snapshot(block_ids, num_full * self.blocks.block_size)

    def unshare(self, block_ids: list[int]) -> None:
        """Drop a ``snapshot``'s references (blocks nobody else holds go back to the free list)."""
        self.blocks.release(block_ids)

    def resume(self, request_id: str) -> None:
        """An export that went nowhere (a hand-over that failed) rejoins the running batch here."""
        seq = self._exports.pop(request_id, None)
        if seq is None:
            raise ValueError(f"request {request_id!r} is not exported from here")
        self.scheduler.add_running(seq)

    def withdraw(self, request_id: str) -> RequestState:
        """A request waiting for its prefill here (new, or preempted and to be recomputed) leaves
        this engine with its state; it holds no blocks. ValueError if it is not waiting."""
        seq = self.scheduler.find(request_id)
        if seq is None or seq.status is not Status.WAITING:
            raise ValueError(f"request {request_id!r} is not waiting here: only a request that "
                             "has no KV yet is withdrawn")
        self.scheduler.detach(seq)
        return state_of(seq)

    def recompute(self, state: RequestState) -> None:
        """A request arriving without its KV waits for a prefill over its prompt and output so
        far, then decodes on (its sampling stream continues); one that has output goes first, as
        a preempted request does. ValueError if its id is in use or it can never fit here."""
        self._check_unused(state.request_id)
        try:
            self.validate(state.token_ids[:state.num_prompt_tokens], state.params)
        except ValueError as exc:
            raise ValueError(f"request {state.request_id!r}: {exc}") from None
        seq = sequence_from(state)
        if seq.num_output_tokens:
            self.scheduler.add_first(seq)
        else:
            self.scheduler.add(seq)

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for an incoming request's ``num_tokens`` of KV, or None (nothing held) if they
        are not free now."""
        self._check_unused(request_id)
        if not self.blocks.can_allocate(num_tokens):
            return None
        self._reserved.add(request_id)
        return list(self.blocks.allocate(request_id, num_tokens))

    def extend(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow a reservation to ``num_tokens`` of KV (a migration's later stages bring more);
        its whole block table, or None (nothing changed) if the blocks are not free now."""
        if request_id not in self._reserved:
            raise ValueError(f"request {request_id!r} has no reservation here: reserve blocks first")
        if not self.blocks.can_append(request_id, num_tokens):
            return None
        self.blocks.append_slot(request_id, num_tokens)
        return list(self.blocks.tables[request_id])

    def admit(self, state: RequestState) -> None:
        """A reserved request whose KV the caller has written joins the running batch."""
        rid = state.request_id
        if rid not in self._reserved:
            raise ValueError(f"request {rid!r} has no reservation here: reserve blocks first")
        slots = len(self.blocks.tables[rid]) * self.blocks.block_size
        if not 0 <= state.num_kv_tokens <= slots:
            raise ValueError(f"request {rid!r} brings {state.num_kv_tokens} tokens of KV for {slots} "
                             "reserved slots")
        self._reserved.discard(rid)
        self.scheduler.add_running(sequence_from(state))

    def release(self, request_id: str) -> None:
        """Free an export's or a reservation's blocks; a no-op for a request not held here."""
        if self._holds(request_id):
            self._exports.pop(request_id, None)
            self._reserved.discard(request_id)
            self.blocks.free(request_id)

    def _holds(self, request_id: str) -> bool:
        return request_id in self._exports or request_id in self._reserved
