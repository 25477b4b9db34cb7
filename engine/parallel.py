"""Which part of the model each worker of a (tp, pp) instance holds. Pure arithmetic, no torch.

Workers are numbered ``rank = pp_rank * tp + tp_rank``. Tensor parallelism splits the attention
heads and the MLP's intermediate dimension evenly; KV heads split evenly too, or, when tp is a
multiple of the KV heads, each rank keeps the one KV head its query heads read (the KV head is
replicated over ``tp / kv_heads`` ranks). Pipeline parallelism gives each stage a contiguous range
of layers, the first ``layers % pp`` stages one more than the rest. The transfer layer's resharding
maps (``transfer/layout.py``) are built on these same functions.
"""
from __future__ import annotations

import msgspec


class Parallelism(msgspec.Struct, frozen=True):
    """An instance's tensor- and pipeline-parallel sizes."""

    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of worker ``rank``."""
        return rank % self.tp, rank // self.tp

    @property
    def output_rank(self) -> int:
        """The worker whose step result is the logits: the last stage's tp rank 0."""
        return self.rank(0, self.pp - 1)


def parallelism_error(par: Parallelism, *, num_heads: int, num_kv_heads: int, num_layers: int) -> str | None:
    """Why ``par`` cannot shard a model of this shape (a sentence naming tp or pp), or None."""
    tp, pp = par.tp, par.pp
    if not (isinstance(tp, int) and isinstance(pp, int)) or tp < 1 or pp < 1:
        return f"tp and pp must be integers >= 1, got tp={tp!r}, pp={pp!r}"
    if num_heads % tp:
        return f"tp={tp} does not divide the {num_heads} attention heads"
    if num_kv_heads % tp and tp % num_kv_heads:
        return (f"tp={tp} must divide the {num_kv_heads} KV heads or be a multiple of them "
                "(each rank keeps whole KV heads, or one replicated KV head)")
    if pp > num_layers:
        return f"pp={pp} exceeds the {num_layers} layers (each stage needs at least one)"
    return None


def check_parallelism(config, par: Parallelism) -> None:
    """ValueError naming tp or pp if ``par`` cannot shard the model ``config`` (a ModelConfig)."""
    error = parallelism_error(par, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                              num_layers=config.num_layers)
    if error is not None:
        raise ValueError(error)


def head_range(num_heads: int, tp: int, tp_rank: int) -> range:
    """The query heads tp rank ``tp_rank`` computes."""
    per = num_heads // tp
    return range(tp_rank * per, (tp_rank + 1) * per)


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """The KV heads tp rank ``tp_rank`` holds (one replicated head when tp > KV heads)."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank * num_kv_heads // tp
    return range(head, head + 1)


def kv_head_replicas(num_kv_heads: int, tp: int, head: int) -> list[int]:
    """The tp ranks holding KV head ``head`` (one rank unless tp > KV heads)."""
    return [r for r in range(tp) if head in kv_head_range(num_kv_heads, tp, r)]


def layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    """The layers pipeline stage ``pp_rank`` runs."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def split_range(size: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(size)`` cut into ``parts`` contiguous pieces as equal as possible
    (the first ``size % parts`` one longer): a rank's share of the MLP or the vocabulary."""
    return layer_range(size, parts, index)


class WorkerShard(msgspec.Struct, frozen=True):
    """What one worker holds: its coordinates and its slices of heads, layers and sizes."""

    parallelism: Parallelism
    rank: int

    @property
    def tp_rank(self) -> int:
        return self.parallelism.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.parallelism.coords(self.rank)[1]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.parallelism.pp - 1


def single_worker() -> WorkerShard:
    return WorkerShard(Parallelism(1, 1), 0)
