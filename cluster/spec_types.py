"""The cluster spec's typed form: frozen structs, one per YAML section, and ``SpecError``.

Only shapes and defaults live here; what makes a spec valid beyond its types is in
``cluster.spec_check`` and the YAML/dict entry points are in ``cluster.spec``.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec

Mode = Literal["disaggregated", "colocated"]
Placement = Literal["explicit", "auto"]
Dtype = Literal["auto", "float32", "bfloat16"]
Device = Literal["cpu", "cuda"]
Backend = Literal["auto", "shm", "ray", "nccl", "cuda_ipc"]
PrefillPolicy = Literal["least_tokens", "round_robin"]
DecodePolicy = Literal["most_free_blocks", "freeness", "round_robin"]


class SpecError(ValueError):
    """An invalid cluster spec. The message starts with the dotted path of the offending field
    (``decode.tp: ...``); a YAML syntax error has no field and starts with ``file:line:column``."""

    def __init__(self, field: str, reason: str, location: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.location = location
        if not field:
            message = f"{location}: {reason}" if location else reason
        else:
            message = f"{field}: {reason}" + (f" (at {location})" if location else "")
        super().__init__(message)

    def __reduce__(self):  # type: ignore[override]
        # Errors cross Ray actor boundaries; the default pickling would call __init__(message).
        return (type(self), (self.field, self.reason, self.location))


class ModelRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which model to serve: a local Hugging Face directory (``path``) or a prepared model name
    (``name``, e.g. ``smollm2``; see ``tandem models``). Exactly one of the two is set. A relative
    path is stored resolved against the spec file's directory."""

    path: str | None = None
    name: str | None = None
    dtype: Dtype = "auto"

    @property
    def source(self) -> str:
        """What to hand to ``engine.prepare.resolve_model``: the path if given, else the name."""
        return self.path if self.path is not None else self.name or ""


class InstanceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One pool of identical engine instances (the prefill pool, the decode pool, or the colocated
    pool). ``replicas``/``tp``/``pp`` are None only under ``placement: auto`` until the planner
    chooses them; under explicit placement an omitted value means 1 (tp x pp worker actors per
    instance above 1). ``chunked_prefill``: every step mixes the running decodes with prompt
    chunks, ``max_batch_tokens`` tokens in all, one prompt's chunk at most ``long_prefill_tokens``
    (engine/scheduler.py). KV
    capacity per instance: ``num_blocks`` blocks, or ``memory_fraction`` (cpu: of the host's RAM, for
    KV; cuda: of the instance's GPU share, for weights, activations and KV, the KV getting what the
    loaded weights and a profiled largest step leave), at most one of the two; neither gives the
    engine's default, 1 GiB of KV.
    A ``device: cuda`` instance reserves ``num_gpus`` of a GPU from Ray (default 1; a fraction lets
    small instances share one) and sees only the GPU Ray assigns it. ``one_node``: each instance's
    tp x pp workers all on one node (Ray's STRICT_PACK; the launch fails if no node can hold
    them); otherwise PACK, which may spread a large instance over nodes. The planner sets it when
    its plan puts every instance on one node."""

    replicas: int | None = None
    tp: int | None = None
    pp: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None
    max_batch_tokens: int = 8192
    max_num_seqs: int = 128
    chunked_prefill: bool = False
    long_prefill_tokens: int | None = None  # with chunked_prefill: one prompt's tokens a step at most
    device: Device = "cpu"
    num_cpus: float = 1.0  # Ray CPUs reserved for each instance (one actor today)
    num_gpus: float | None = None  # GPUs reserved for each cuda instance: 1, or a share of one
    max_restarts: int = 3  # Ray restarts an instance whose process dies or whose step fails
    one_node: bool = False

    @property
    def is_planned(self) -> bool:
        """True when replicas, tp and pp are all known."""
        return None not in (self.replicas, self.tp, self.pp)


class TransferSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How KV caches move from prefill to decode instances (colocated instances move none).
    ``auto``: shared memory between CPU instances on one node, CUDA IPC between GPU instances on
    one node, the Ray object store across nodes. ``cuda_ipc``: GPU caches on one node.
    ``nccl`` (GPU to GPU) needs the two instances on different GPUs."""

    backend: Backend = "auto"
    timeout_s: float = 30.0


class RouterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dispatch policies of the router and the longest a request may live end to end."""

    prefill_policy: PrefillPolicy = "least_tokens"
    decode_policy: DecodePolicy = "most_free_blocks"
    request_timeout_s: float = 600.0
    result_ttl_s: float = 60.0  # a finished request nobody reads is dropped after this long
    max_requests: int = 20_000  # requests in flight beyond which submit fails as overloaded
    health_timeout_s: float = 10.0  # an instance silent this long leaves service until it answers
    # Requests an instance held when it left service go on elsewhere, recomputed (greedy and
    # unseeded ones; a seeded one fails: its sampling stream was lost with the instance).
    recompute_lost: bool = False


class HttpSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The OpenAI-compatible HTTP front end `tandem serve` runs (``--http``/``--http-replicas``
    override it). The API key is never in the spec: ``--api-key`` or ``$TANDEM_API_KEY``."""

    port: int
    host: str = "127.0.0.1"
    replicas: int = 1  # ingress processes sharing the port


class MigrationSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Live migration of decoding requests between decode instances. ``enabled`` turns on the
    periodic rebalancer (cluster/rebalance.py); drains and explicit migrations work either way and
    use the same budget and stages. ``imbalance_threshold`` is a gap in freeness (free blocks per
    running request) between two instances. A migration copies the request's KV in up to
    ``max_stages`` pre-copy stages while it keeps decoding, stopping early when fewer than
    ``min_stage_blocks`` new blocks are left, then pauses it to copy the rest. A request whose
    context is at most ``recompute_max_tokens`` moves by recompute instead (no copy: the
    destination prefills it again; 0: never). Requests still waiting for their prefill (colocated
    mode) are simply re-dispatched. ``growth_horizon_tokens``: freeness also counts the blocks each
    running request will grow into over this many more tokens (at most to its ``max_tokens``;
    0: only what it holds, as Llumnix)."""

    enabled: bool = False
    interval_s: float = 0.5  # how often the rebalancer looks
    imbalance_threshold: float = 4.0
    max_moves_per_pass: int = 4
    max_blocks_in_flight: int = 4096  # per instance, migrations in and out together
    max_bytes_in_flight: int = 1 << 30  # per instance, the same blocks counted in bytes
    max_stages: int = 3
    min_stage_blocks: int = 2
    recompute_max_tokens: int = 0
    growth_horizon_tokens: int = 256


class SloSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Latency targets; a request attains when it meets both. Same fields as ``placement``'s Slo."""

    ttft_ms: float
    tpot_ms: float
    attainment: float = 0.9


class PlanningCluster(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The machines the planner may use: identical nodes of ``devices_per_node`` devices each. For
    CPU pools a device is one instance's ``num_cpus`` slice of a node."""

    nodes: int
    devices_per_node: int


class PlanningSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the placement planner needs under ``placement: auto`` that the rest of the spec does
    not say. ``hardware``, ``workload``, ``policy`` and ``search`` use the placement spec's schema
    (placement/problem.py) and stay plain mappings here: ``placement.problem_from_dict`` is their
    one parser, so the two spec formats cannot drift apart. ``calibration`` (a ``tandem profile``
    output) and a workload ``trace`` are stored resolved against the spec file's directory.
    Omitted: hardware ``cpu`` for CPU pools; ``cluster`` from the Ray cluster at launch (this host
    for an offline ``tandem plan``). ``allow_colocated``: the planner may launch colocated
    instances instead when they are predicted to serve the SLO better (cluster/autoplace.py)."""

    hardware: str | dict[str, Any] | None = None
    calibration: str | None = None
    cluster: PlanningCluster | None = None
    workload: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    allow_colocated: bool = True


class ModelCheck(msgspec.Struct, frozen=True):
    """Outcome of the model-aware checks (tp/pp divisibility against config.json). Not part of the
    YAML: ``parse_spec`` fills it. ``config_path`` is the file checked; when the checks could not
    run (model not present on this machine) ``skipped_reason`` says why."""

    config_path: str | None = None
    skipped_reason: str | None = "spec not built by parse_spec"

    @property
    def checked(self) -> bool:
        return self.config_path is not None


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole deployment. In ``disaggregated`` mode ``prefill`` and ``decode`` are set and
    ``instances`` is None; in ``colocated`` mode only ``instances`` is set. ``planning`` is only
    allowed under ``placement: auto`` (cluster/autoplace.py turns it into a plan)."""

    name: str
    mode: Mode = "disaggregated"
    placement: Placement = "explicit"
    model: ModelRef
    prefill: InstanceSpec | None = None
    decode: InstanceSpec | None = None
    instances: InstanceSpec | None = None
    transfer: TransferSpec = TransferSpec()
    router: RouterSpec = RouterSpec()
    http: HttpSpec | None = None
    migration: MigrationSpec = MigrationSpec()
    slo: SloSpec | None = None
    planning: PlanningSpec | None = None
    model_check: ModelCheck = ModelCheck()
    # ``decode`` given as a list of pools: the first is ``decode``, the rest are here.
    more_decode: tuple[InstanceSpec, ...] = ()

    @property
    def decode_pools(self) -> tuple[InstanceSpec, ...]:
        return () if self.decode is None else (self.decode, *self.more_decode)

    @property
    def sections(self) -> dict[str, InstanceSpec]:
        """The instance pools in use, by section name: prefill and decode (decode.0, decode.1, ...
        for a list of decode pools), or instances."""
        if self.mode == "colocated":
            return {} if self.instances is None else {"instances": self.instances}
        named = {"prefill": self.prefill} if self.prefill is not None else {}
        pools = self.decode_pools
        return named | dict(zip(decode_section_names(len(pools)), pools))

    @property
    def needs_planning(self) -> bool:
        """True while some pool's replicas/tp/pp are left for the placement planner."""
        return any(not s.is_planned for s in self.sections.values())


def decode_section_names(count: int) -> list[str]:
    """How specs, their errors and pre-flight name decode pools: ``decode`` for one, ``decode.0``,
    ``decode.1``, ... for a list (the YAML path of each)."""
    return ["decode"] if count == 1 else [f"decode.{i}" for i in range(count)]


# Fields a YAML document may not set: parse_spec computes them.
INTERNAL_FIELDS = frozenset({"model_check", "more_decode"})
