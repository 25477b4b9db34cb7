"""Transport construction by name. GPU and Ray backends import their libraries lazily."""
from __future__ import annotations

from transfer.base import Transport

BACKENDS = ("auto", "ray", "local", "nccl")


def make_transport(name: str) -> Transport:
    if name in ("auto", "ray"):
        from transfer.ray_transport import RayObjectTransport

        return RayObjectTransport()
    if name == "local":
        from transfer.local import LocalTransport

        return LocalTransport()
    if name == "nccl":
        raise NotImplementedError("the nccl transport is not implemented yet; use backend 'ray'")
    raise ValueError(f"unknown transfer backend {name!r} (expected one of: {', '.join(BACKENDS)})")
