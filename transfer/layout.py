"""KV resharding between instances of different parallelism. Pure: no torch, no Ray.

A worker of a (tp, pp) instance holds the KV of its stage's layers and its tp rank's KV heads
(``engine/parallel.py``). Moving a request from a source instance to a destination instance of
another (tp', pp') is a set of ``KVSlice``s: for each destination worker, which source worker sends
which (layer range, KV-head range). Every (layer, KV head) a destination worker needs comes exactly
once; a KV head replicated over several source ranks (tp > KV heads) is read from one replica,
spread over the replicas so that no source rank sends them all.
"""
from __future__ import annotations

import msgspec

from tandem.engine.parallel import Parallelism, kv_head_range, kv_head_replicas, layer_range


class KVSlice(msgspec.Struct, frozen=True):
    """Source worker ``src_rank`` sends layers ``[layers[0], layers[1])`` x KV heads
    ``[kv_heads[0], kv_heads[1])`` (model-global indices) to destination worker ``dst_rank``."""

    src_rank: int
    dst_rank: int
    layers: tuple[int, int]
    kv_heads: tuple[int, int]


class WorkerKV(msgspec.Struct, frozen=True):
    """The global layers and KV heads one worker's cache holds, in its local order."""

    layers: tuple[int, int]
    kv_heads: tuple[int, int]

    def local(self, piece: KVSlice) -> tuple[slice, slice]:
        """``piece``'s (layer, KV head) ranges as slices of this worker's own cache."""
        return (slice(piece.layers[0] - self.layers[0], piece.layers[1] - self.layers[0]),
                slice(piece.kv_heads[0] - self.kv_heads[0], piece.kv_heads[1] - self.kv_heads[0]))


def worker_kv(par: Parallelism, num_layers: int, num_kv_heads: int, rank: int) -> WorkerKV:
    tp_rank, pp_rank = par.coords(rank)
    layers = layer_range(num_layers, par.pp, pp_rank)
    heads = kv_head_range(num_kv_heads, par.tp, tp_rank)
    return WorkerKV((layers.start, layers.stop), (heads.start, heads.stop))


def reshard_plan(src: Parallelism, dst: Parallelism, num_layers: int, num_kv_heads: int) -> list[KVSlice]:
    """Every slice a move from ``src`` to ``dst`` copies, ordered by destination worker."""
    plan: list[KVSlice] = []
    for dst_rank in range(dst.world_size):
        need = worker_kv(dst, num_layers, num_kv_heads, dst_rank)
        for stage in range(src.pp):
            stage_layers = layer_range(num_layers, src.pp, stage)
            lo, hi = max(need.layers[0], stage_layers.start), min(need.layers[1], stage_layers.stop)
            if lo >= hi:
                continue
            for tp_rank, heads in _head_sources(src.tp, num_kv_heads, range(*need.kv_heads), dst_rank):
                plan.append(KVSlice(src.rank(tp_rank, stage), dst_rank, (lo, hi), heads))
    return plan


def _head_sources(tp: int, num_kv_heads: int, heads: range, spread: int) -> list[tuple[int, tuple[int, int]]]:
    """(source tp rank, KV-head range) runs covering ``heads``: each head from one of its
    replicas (chosen by ``spread``), consecutive heads of one rank merged into one range."""
    runs: list[tuple[int, tuple[int, int]]] = []
    for head in heads:
        replicas = kv_head_replicas(num_kv_heads, tp, head)
        rank = replicas[spread % len(replicas)]
        if runs and runs[-1][0] == rank and runs[-1][1][1] == head:
            runs[-1] = (rank, (runs[-1][1][0], head + 1))
        else:
            runs.append((rank, (head, head + 1)))
    return runs
