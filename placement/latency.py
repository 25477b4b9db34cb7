"""Step-time models: how long an instance with parallelism (tp, pp) takes for a batch.

The analytic model is a roofline per kernel family and pipeline stage: the GEMMs take the larger of
their FLOPs at the efficient fraction of peak and their weight reads at the efficient fraction of
bandwidth; attention adds prompt attention FLOPs plus the larger of decode attention FLOPs and KV
reads/writes (separate kernels, so these add rather than overlap with the GEMMs); then come the
tensor-parallel all-reduces (two per layer, ring algorithm over intra-node links). Taking one max
over a whole mixed step instead would let prompt tokens ride free on memory-bound decode steps,
hiding the prefill-decode interference that a colocated baseline really pays. Stages hand activations to the
next stage over an intra- or inter-node link. Coefficients are precomputed once per instance shape
because the simulator calls these functions tens of thousands of times per run.

All times are seconds. Batches are described by sums, not lists, so the simulator can keep running
totals: prefill by (sequences, tokens = sum of lengths, sum of squared lengths); decode by
(batch size, sum of context lengths).
"""
from __future__ import annotations

from typing import Protocol

from .hardware import HardwareProfile
from .model_spec import DTYPE_BYTES, ModelSpec


class StepModel(Protocol):
    """What the simulator needs from a latency model of one instance."""

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        """(latency until the batch's first tokens exist, time until the next batch may start)."""
        ...

    def decode(self, batch: int, sum_ctx: int) -> float:
        """Time of one decode iteration that advances every running sequence by one token."""
        ...

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        """One colocated step: whole prompts prefilled alongside a decode batch."""
        ...


class AnalyticLatency:
    """Roofline step times for one instance shape; see the module docstring for the terms."""

    def __init__(self, model: ModelSpec, hw: HardwareProfile, dtype: str, tp: int, pp: int,
                 pp_cross_node: bool = False) -> None:
        self.tp, self.pp = tp, pp
        nbytes = DTYPE_BYTES[dtype]
        lps = model.layers / pp  # layers per stage
        self._flops = hw.peak_flops(dtype) * hw.compute_efficiency
        self._bw = hw.mem_bw * hw.bandwidth_efficiency
        self._overhead = hw.step_overhead_s
        self._f_tok = 2 * model.layer_params * lps / tp
        self._f_prefill_attn = 2 * model.q_dim * lps / tp  # causal: QK^T and AV over l^2/2 pairs
        self._f_decode_attn = 4 * model.q_dim * lps / tp
        self._f_head = 2 * model.vocab * model.hidden / tp  # LM head, last stage, one row per seq
        self._b_weights = model.layer_params * lps * nbytes / tp
        self._b_head = model.vocab * model.hidden * nbytes / tp
        self._b_kv = 2 * model.kv_dim * nbytes * lps / tp  # per token read or written
        if tp > 1:  # two ring all-reduces of (tokens x hidden) per layer
            self._ar_fixed = 2 * lps * hw.intra_node_latency_s
            self._ar_tok = 2 * lps * 2 * (tp - 1) / tp * model.hidden * nbytes / hw.intra_node_bw
        else:
            self._ar_fixed = self._ar_tok = 0.0
        link_bw = hw.inter_node_bw if pp_cross_node else hw.intra_node_bw
        link_lat = hw.inter_node_latency_s if pp_cross_node else hw.intra_node_latency_s
        self._ho_fixed = link_lat
        self._ho_tok = model.hidden * nbytes / link_bw

    def _stage(self, tokens: float, pf_attn: float, dec_attn: float, seqs: float, kv_tokens: float,
               last: bool) -> float:
        flops, weights = self._f_tok * tokens, self._b_weights
        if last:
            flops += self._f_head * seqs
            weights += self._b_head
        gemm = max(flops / self._flops, weights / self._bw)
        attention = (self._f_prefill_attn * pf_attn / self._flops
                     + max(self._f_decode_attn * dec_attn / self._flops, self._b_kv * kv_tokens / self._bw))
        return gemm + attention + self._ar_fixed + self._ar_tok * tokens

    def _handoff(self, tokens: float) -> float:
        return self._ho_fixed + self._ho_tok * tokens

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        last = self._stage(tokens, sum_sq, 0.0, seqs, tokens, True)
        if self.pp == 1:
            return self._overhead + last, self._overhead + last
        mid = self._stage(tokens, sum_sq, 0.0, seqs, tokens, False)
        latency = (self.pp - 1) * (mid + self._handoff(tokens)) + last
        # Batches pipeline: the next one enters stage 0 once the slowest stage is free.
        return self._overhead + latency, self._overhead + max(mid, last)

    def _period(self, tokens: float, pf_attn: float, dec_attn: float, seqs: int, kv: float) -> float:
        # A step's sequences are split into k micro-batches that flow through the pp stages; with
        # a full pipeline each stage works on every micro-batch once per step, otherwise the step
        # lasts as long as one micro-batch's trip through all stages.
        k = min(seqs, self.pp) or 1
        t, a, d, s, v = tokens / k, pf_attn / k, dec_attn / k, seqs / k, kv / k
        last = self._stage(t, a, d, s, v, True)
        if self.pp == 1:
            return self._overhead + last
        mid = self._stage(t, a, d, s, v, False)
        trip = (self.pp - 1) * mid + last + self.pp * self._handoff(t)
        return self._overhead + max(k * last, trip)

    def decode(self, batch: int, sum_ctx: int) -> float:
        return self._period(batch, 0.0, sum_ctx, batch, sum_ctx + batch)

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        return self._period(tokens + batch, sum_sq, sum_ctx, seqs + batch, tokens + batch + sum_ctx)


def kv_transfer_cost(model: ModelSpec, hw: HardwareProfile, dtype: str, src_workers: int,
                     dst_workers: int, same_node: bool) -> tuple[float, float]:
    """(fixed seconds, seconds per prompt token) to move a request's KV between two instances.

    Each worker owns a slice of the KV and sends it over its own link, so min(src, dst) links run
    in parallel. Same node: NVLink/PCIe peer copies; otherwise each device's NIC.
    """
    bw = hw.intra_node_bw if same_node else hw.inter_node_bw
    latency = hw.intra_node_latency_s if same_node else hw.inter_node_latency_s
    links = max(1, min(src_workers, dst_workers))
    return latency, model.kv_bytes_per_token(dtype) / (bw * links)
