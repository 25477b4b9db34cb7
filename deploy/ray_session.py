"""Connecting to Ray from the CLI: an existing cluster when there is one, else a local one."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect_ray(address: str | None = None, num_cpus: int | None = None, *, local_ok: bool = True):
    """Join `address` (or $RAY_ADDRESS / a running local head); start a local cluster if allowed."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="tandem", log_to_driver=False)
        return ray
    try:
        ray.init(address="auto", namespace="tandem", log_to_driver=False)
    except ConnectionError:
        if not local_ok:
            raise
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="tandem", log_to_driver=False)
    return ray
