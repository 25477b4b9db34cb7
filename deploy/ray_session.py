"""Connecting to Ray from the CLI: an existing cluster when there is one, else a local one.

A local cluster that tandem starts uses Ray's token authentication, Ray's default for local
clusters since 2.59 (a process without the token cannot join it or submit work; tandem warns if
``RAY_AUTH_MODE=disabled`` turns it off), and Ray's token file is made readable by its owner only
(Ray writes it world-readable). Its services still listen on every interface: Ray 2.60 binds its
GCS, raylets and workers so whatever node address it is given.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

log = logging.getLogger(__name__)

# Ray starts worker processes at niceness 15, so that its own daemons stay responsive beside
# batch jobs; an engine's threads at 15 lose their cores to any process at 0 (the router, an HTTP
# ingress, a client on the same host): benchmarks/RESULTS.md, issue 21's section, measured the
# difference on a 2-core host. A cluster tandem starts runs its actors at 0; for
# one started with `ray start`, set RAY_worker_niceness=0 in its environment.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


def connect_ray(address: str | None = None, num_cpus: int | None = None, *, local_ok: bool = True):
    """Join `address` (or $RAY_ADDRESS / a running local head); start a token-authenticated
    local cluster if allowed."""
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
        if os.environ.get("RAY_AUTH_MODE") == "disabled":
            log.warning("RAY_AUTH_MODE=disabled: anyone who can reach this host can use the local "
                        "Ray cluster tandem starts")
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="tandem", log_to_driver=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)
        protect_token_file()
    return ray


def token_file() -> Path:
    """Where Ray keeps its authentication token (``RAY_AUTH_TOKEN_PATH`` or its default)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def protect_token_file(path: Path | None = None) -> bool:
    """Make Ray's token file readable by its owner only (Ray writes it world-readable); whether
    it had to be changed."""
    path = path or token_file()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not mode & 0o077:
        return False
    path.chmod(0o600)
    log.warning("made Ray's token file %s readable by its owner only (it was %o)", path, mode)
    return True
