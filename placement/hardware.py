"""Device and interconnect profiles the latency model reads.

Numbers are per device, in SI units (FLOP/s, bytes/s, bytes, seconds). Peak FLOP/s are dense
tensor-core rates (no structured sparsity). Bandwidths are one direction per device: NVLink 3 gives
an A100 300 GB/s each way; a DGX-class node gives each GPU its own 200 Gb/s (A100) or 400 Gb/s (H100)
NIC, so the inter-node figure is per device as well.
"""
from __future__ import annotations

import msgspec

GIB = 1024**3
GB = 1e9
TFLOPS = 1e12


class HardwareProfile(msgspec.Struct, frozen=True):
    """One accelerator type plus the links between accelerators of that type.

    ``compute_efficiency`` and ``bandwidth_efficiency`` are the fractions of peak a well-tuned engine
    reaches on large GEMMs and on streaming weight/KV reads; the analytic model multiplies peaks by
    them. ``step_overhead_s`` is the fixed per-step cost (scheduling, kernel launches) a step pays
    however small it is.
    """

    name: str
    flops: dict[str, float]  # dtype -> peak dense FLOP/s
    memory_bytes: float
    mem_bw: float  # bytes/s
    intra_node_bw: float  # bytes/s per device, one direction
    inter_node_bw: float  # bytes/s per device, one direction
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 30e-6
    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    step_overhead_s: float = 3e-3

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.flops[dtype]
        except KeyError:
            have = ", ".join(sorted(self.flops))
            raise ValueError(f"dtype {dtype} not supported by hardware {self.name} (has: {have})") from None


def _gpu(name: str, fp16_tflops: float, memory_gib: float, mem_bw_gb: float, intra_gb: float,
         inter_gb: float, extra: dict[str, float] | None = None) -> HardwareProfile:
    flops = {"fp16": fp16_tflops * TFLOPS, "bf16": fp16_tflops * TFLOPS}
    # fp32 runs through TF32 tensor cores in every engine we target: half the fp16 rate.
    flops["fp32"] = fp16_tflops * TFLOPS / 2
    for dtype, tflops in (extra or {}).items():
        flops[dtype] = tflops * TFLOPS
    return HardwareProfile(name=name, flops=flops, memory_bytes=memory_gib * GIB,
                           mem_bw=mem_bw_gb * GB, intra_node_bw=intra_gb * GB,
                           inter_node_bw=inter_gb * GB)


PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        _gpu("A100-40GB", 312, 40, 1555, 300, 25, {"int8": 624}),
        _gpu("A100-80GB", 312, 80, 2039, 300, 25, {"int8": 624}),
        _gpu("H100-80GB", 989, 80, 3350, 450, 50, {"fp8": 1979, "int8": 1979}),
        _gpu("H200", 989, 141, 4800, 450, 50, {"fp8": 1979, "int8": 1979}),
        # L40S has no NVLink: peers talk over PCIe Gen4 x16 (~25 GB/s achieved each way).
        _gpu("L40S", 362, 48, 864, 25, 6.25, {"fp8": 733, "int8": 733}),
        # A 2-core CPU slice like the CI machine: measured ~12.8 GB/s memcpy; 10 GbE between nodes.
        HardwareProfile(name="cpu", flops={"fp32": 0.15 * TFLOPS, "bf16": 0.1 * TFLOPS,
                                           "fp16": 0.05 * TFLOPS},
                        memory_bytes=16 * GIB, mem_bw=20 * GB, intra_node_bw=12.8 * GB,
                        inter_node_bw=1.25 * GB, intra_node_latency_s=50e-6,
                        inter_node_latency_s=200e-6, compute_efficiency=0.5,
                        bandwidth_efficiency=0.6, step_overhead_s=5e-3),
    )
}

_ALIASES = {name.lower(): name for name in PROFILES}
_ALIASES.update({"a100": "A100-80GB", "h100": "H100-80GB", "h200-141gb": "H200", "l40s-48gb": "L40S"})


def get_profile(name: str) -> HardwareProfile:
    """Look a named profile up (case-insensitive); ValueError lists the known names."""
    key = _ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown hardware profile {name!r} (known: {', '.join(PROFILES)})")
    return PROFILES[key]


class CustomHardware(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `hardware:` mapping of a spec, in human units; omitted fields come from ``base``."""

    name: str = "custom"
    base: str | None = None
    tflops: dict[str, float] | None = None
    memory_gib: float | None = None
    mem_bw_gb_s: float | None = None
    intra_node_gb_s: float | None = None
    inter_node_gb_s: float | None = None
    intra_node_latency_us: float | None = None
    inter_node_latency_us: float | None = None
    compute_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    step_overhead_ms: float | None = None


_SCALED = (  # spec field, profile field, multiplier to SI
    ("memory_gib", "memory_bytes", GIB),
    ("mem_bw_gb_s", "mem_bw", GB),
    ("intra_node_gb_s", "intra_node_bw", GB),
    ("inter_node_gb_s", "inter_node_bw", GB),
    ("intra_node_latency_us", "intra_node_latency_s", 1e-6),
    ("inter_node_latency_us", "inter_node_latency_s", 1e-6),
    ("compute_efficiency", "compute_efficiency", 1.0),
    ("bandwidth_efficiency", "bandwidth_efficiency", 1.0),
    ("step_overhead_ms", "step_overhead_s", 1e-3),
)
_REQUIRED_WITHOUT_BASE = ("tflops", "memory_gib", "mem_bw_gb_s", "intra_node_gb_s", "inter_node_gb_s")


def profile_from_custom(spec: CustomHardware) -> HardwareProfile:
    """Build a profile from a custom mapping; raises ValueError("field: reason")."""
    values: dict[str, object] = {}
    if spec.base is not None:
        try:
            values = {f: getattr(get_profile(spec.base), f) for f in HardwareProfile.__struct_fields__}
        except ValueError as exc:
            raise ValueError(f"base: {exc}") from None
    else:
        for field in _REQUIRED_WITHOUT_BASE:
            if getattr(spec, field) is None:
                raise ValueError(f"{field}: required when no `base` profile is given")
    values["name"] = spec.name if spec.name != "custom" or spec.base is None else f"{spec.base}-custom"
    if spec.tflops is not None:
        for dtype, tflops in spec.tflops.items():
            if tflops <= 0:
                raise ValueError(f"tflops.{dtype}: must be > 0")
        values["flops"] = {dtype: t * TFLOPS for dtype, t in spec.tflops.items()}
    for field, target, scale in _SCALED:
        value = getattr(spec, field)
        if value is None:
            continue
        zero_ok = field.endswith(("_us", "_ms"))  # a link or step may be modelled as free
        if value < 0 or (value == 0 and not zero_ok):
            raise ValueError(f"{field}: must be {'>=' if zero_ok else '>'} 0")
        if field.endswith("efficiency") and value > 1:
            raise ValueError(f"{field}: must be <= 1")
        values[target] = value * scale
    return HardwareProfile(**values)  # type: ignore[arg-type]
