"""What the launcher starts (pure data, no Ray)."""
from __future__ import annotations

import msgspec

from tandem.engine.engine import EngineConfig


class InstanceGroup(msgspec.Struct, frozen=True):
    replicas: int
    engine: EngineConfig
    num_cpus: float = 1.0
    num_threads: int = 1


class LaunchConfig(msgspec.Struct, frozen=True):
    """What to start. ``decode`` holds the engine instances in colocated mode."""

    name: str
    model_dir: str
    decode: InstanceGroup
    prefill: InstanceGroup | None = None
    mode: str = "disaggregated"
    transfer_backend: str = "ray"
    transfer_timeout_s: float = 30.0
    request_timeout_s: float = 600.0  # the router times out any request older than this
    result_ttl_s: float = 60.0  # how long the router keeps a finished request nobody reads
    prefill_policy: str = "least_tokens"
    decode_policy: str = "most_free_blocks"
