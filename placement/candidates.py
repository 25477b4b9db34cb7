"""Which instance shapes are legal, and where instances go on the cluster's nodes.

Pruning happens here, before any simulation: a shape is legal when tp divides both the attention
and the KV heads, pp divides the layers, tp fits in a node (tensor parallelism needs the fast
intra-node links), tp and pp stay within ``search.max_tp``/``max_pp`` (what the serving engine can
run), and the heaviest device holds its weights, workspace and the KV of the longest request the
phase must hold (plus the admission watermark).
"""
from __future__ import annotations

import math
from typing import Literal

import msgspec

from .memory import blocks_for, instance_memory
from .model_spec import ModelSpec
from .plan import InstancePlacement, StagePlacement
from .problem import Cluster, Problem

PhaseName = Literal["prefill", "decode", "colocated"]


class Shape(msgspec.Struct, frozen=True, order=True):
    """Parallelism of one instance."""

    tp: int
    pp: int

    @property
    def devices(self) -> int:
        return self.tp * self.pp


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divisibility_error(model: ModelSpec, tp: int, pp: int) -> str | None:
    """Why (tp, pp) cannot shard ``model``, or None if it can."""
    if tp < 1 or pp < 1:
        return "tp and pp must be >= 1"
    if model.heads % tp:
        return f"tp={tp} does not divide the {model.heads} attention heads"
    if model.kv_heads % tp:
        return f"tp={tp} does not divide the {model.kv_heads} KV heads"
    if model.layers % pp:
        return f"pp={pp} does not divide the {model.layers} layers"
    return None


def required_kv_blocks(problem: Problem, phase: PhaseName) -> int:
    """Blocks an instance of ``phase`` must be able to hold for the longest request, +watermark."""
    max_in, max_out = problem.workload.max_lengths(problem.model.max_positions)
    bs = problem.policy.block_size
    if phase == "prefill":
        return blocks_for(max_in, bs)
    need = blocks_for(max_in + max_out + 1, bs)
    return math.ceil(need / (1 - problem.policy.watermark)) + 1


def kv_blocks(problem: Problem, shape: Shape) -> int:
    mem = instance_memory(problem.model, problem.hardware, problem.dtype, shape.tp, shape.pp,
                          problem.policy)
    return mem.kv_tokens // problem.policy.block_size


def legal_shapes(problem: Problem, phase: PhaseName, max_devices: int | None = None) -> list[Shape]:
    """Shapes that divide the model, fit the cluster and hold the phase's longest request."""
    cluster, model = problem.cluster, problem.model
    limit = cluster.devices if max_devices is None else max_devices
    need = required_kv_blocks(problem, phase)
    shapes = []
    for tp in divisors(math.gcd(model.heads, model.kv_heads)):
        if tp > min(cluster.devices_per_node, problem.search.max_tp):
            continue
        for pp in divisors(model.layers):
            if pp > problem.search.max_pp or tp * pp > limit:
                continue
            shape = Shape(tp, pp)
            if kv_blocks(problem, shape) >= need:
                shapes.append(shape)
    return shapes


def memory_explanation(problem: Problem, phase: PhaseName) -> str:
    """Why no shape fits: weights and minimum KV against the largest instance the cluster allows."""
    model, hw, cluster = problem.model, problem.hardware, problem.cluster
    gib = 1024**3
    tps = [t for t in divisors(math.gcd(model.heads, model.kv_heads))
           if t <= min(cluster.devices_per_node, problem.search.max_tp)]
    pps = [p for p in divisors(model.layers) if p <= problem.search.max_pp]
    pairs = [(t, p) for t in tps for p in pps if t * p <= cluster.devices]
    max_in, max_out = problem.workload.max_lengths(model.max_positions)
    tokens = max_in if phase == "prefill" else max_in + max_out
    kv_gib = tokens * model.kv_bytes_per_token(problem.dtype) / gib
    weights_gib = model.weight_bytes(problem.dtype) / gib
    head = (f"{model.name} needs {weights_gib:.1f} GiB of {problem.dtype} weights plus "
            f"{kv_gib:.2f} GiB of KV for its longest {phase} request ({tokens} tokens)")
    if not pairs:
        return f"{head}, but no (tp, pp) divides its heads/layers within {cluster.devices} devices"
    tp, pp = max(pairs, key=lambda x: (x[0] * x[1], x[0]))
    mem = instance_memory(model, hw, problem.dtype, tp, pp, problem.policy)
    return (f"{head}; the largest instance this cluster allows (tp={tp}, pp={pp}, {tp * pp} x "
            f"{hw.memory_bytes / gib:.0f} GiB {hw.name}, {problem.policy.memory_utilization:.0%} usable) "
            f"puts {mem.weight_bytes / gib:.1f} GiB of weights and {mem.workspace_bytes / gib:.1f} GiB "
            f"of workspace on its fullest device of {mem.usable_bytes / gib:.1f} GiB, leaving room for "
            f"{mem.kv_tokens} KV tokens")


class NodePool:
    """Free device indices per node; allocation is first-fit over nodes, lowest indices first."""

    def __init__(self, cluster: Cluster) -> None:
        self.free = [list(range(cluster.devices_per_node)) for _ in range(cluster.nodes)]

    def take(self, node: int, count: int) -> tuple[int, ...]:
        got, self.free[node] = self.free[node][:count], self.free[node][count:]
        return tuple(got)

    def place(self, shape: Shape) -> InstancePlacement | None:
        """Put a whole instance on one node if it fits there, else stage by stage across nodes."""
        for node, free in enumerate(self.free):
            if len(free) >= shape.devices:
                per_stage = [self.take(node, shape.tp) for _ in range(shape.pp)]
                return InstancePlacement(tuple(StagePlacement(node, d) for d in per_stage))
        stages = []
        for _ in range(shape.pp):
            node = next((i for i, f in enumerate(self.free) if len(f) >= shape.tp), None)
            if node is None:
                return None
            stages.append(StagePlacement(node, self.take(node, shape.tp)))
        return InstancePlacement(tuple(stages))


def _interleave(n: int, m: int) -> list[int]:
    """Phase order 0/1 spreading decode instances among prefill ones (keeps KV pulls on-node)."""
    order, a, b = [], 0, 0
    while a < n or b < m:
        if b >= m or (a < n and a * m <= b * n):
            order.append(0)
            a += 1
        else:
            order.append(1)
            b += 1
    return order


def pack_high_affinity(cluster: Cluster, p: Shape, n: int, d: Shape, m: int
                       ) -> tuple[tuple[InstancePlacement, ...], tuple[InstancePlacement, ...]] | None:
    """Map n prefill and m decode instances onto nodes, or None if they do not fit.

    Interleaving puts decode instances next to the prefill instances that feed them; if that
    fragments the nodes, largest-first packing is tried instead.
    """
    if n * p.devices + m * d.devices > cluster.devices:
        return None
    big_first = sorted([0] * n + [1] * m, key=lambda ph: -(p, d)[ph].devices)
    for order in (_interleave(n, m), big_first):
        pool, placed = NodePool(cluster), ([], [])  # type: ignore[var-annotated]
        for phase in order:
            inst = pool.place((p, d)[phase])
            if inst is None:
                break
            placed[phase].append(inst)
        else:
            return tuple(placed[0]), tuple(placed[1])
    return None


def pack_low_affinity(cluster: Cluster, inter_pp: int, p: Shape, k_p: int, d: Shape, k_d: int,
                      groups: int) -> tuple[tuple[InstancePlacement, ...], tuple[InstancePlacement, ...]]:
    """Algorithm 2's layout: a group spans ``inter_pp`` nodes; on each node sit one pipeline
    segment of each of its k_p prefill and k_d decode instances, so every layer's KV moves
    between devices of the same node. ``p.pp`` and ``d.pp`` are multiples of ``inter_pp``.
    """
    pool = NodePool(cluster)
    prefill: list[list[StagePlacement]] = [[] for _ in range(groups * k_p)]
    decode: list[list[StagePlacement]] = [[] for _ in range(groups * k_d)]
    for g in range(groups):
        for seg in range(inter_pp):
            node = g * inter_pp + seg
            for shape, count, out in ((p, k_p, prefill), (d, k_d, decode)):
                for i in range(count):
                    for _ in range(shape.pp // inter_pp):  # intra-node stages of this segment
                        out[g * count + i].append(StagePlacement(node, pool.take(node, shape.tp)))
    return (tuple(InstancePlacement(tuple(s)) for s in prefill),
            tuple(InstancePlacement(tuple(s)) for s in decode))


def layer_nodes(inst: InstancePlacement, layers: int) -> tuple[int, ...]:
    per_stage = layers // len(inst.stages)
    return tuple(inst.stages[layer // per_stage].node for layer in range(layers))


def kv_is_local(src: InstancePlacement, dst: InstancePlacement, layers: int) -> bool:
    """True when every layer's KV sits on the same node in both instances (no NIC involved)."""
    return layer_nodes(src, layers) == layer_nodes(dst, layers)
