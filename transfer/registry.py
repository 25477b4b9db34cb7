"""Transport construction by name. GPU and Ray backends import their libraries lazily.

Inside a Ray actor the transports learn their node (shm, auto: same-node checks) and their own
actor handle (auto, nccl: a destination asks the source actor for a cross-node export, or to send).
"""
from __future__ import annotations

from typing import Any

from tandem.transfer.base import Transport

BACKENDS = ("auto", "shm", "ray", "local", "nccl", "cuda_ipc")


def _ray_identity() -> tuple[str, Any]:
    """(node id, this actor's handle) when running under Ray; ("", None) otherwise."""
    import ray

    if not ray.is_initialized():
        return "", None
    context = ray.get_runtime_context()
    actor = context.current_actor if context.get_actor_id() is not None else None
    return context.get_node_id(), actor


def make_transport(name: str) -> Transport:
    if name == "ray":
        from tandem.transfer.ray_transport import RayObjectTransport

        return RayObjectTransport()
    if name == "shm":
        from tandem.transfer.shm import ShmTransport

        return ShmTransport(node_id=_ray_identity()[0])
    if name == "auto":
        from tandem.transfer.auto import AutoTransport

        return AutoTransport(*_ray_identity())
    if name == "local":
        from tandem.transfer.local import LocalTransport

        return LocalTransport()
    if name == "cuda_ipc":
        from tandem.transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(node_id=_ray_identity()[0])
    if name == "nccl":
        from tandem.transfer.nccl import NcclTransport

        # Without CUDA or NCCL: RuntimeError("nccl needs CUDA and cupy with NCCL: <why not>").
        return NcclTransport(source_actor=_ray_identity()[1])
    raise ValueError(f"unknown transfer backend {name!r} (expected one of: {', '.join(BACKENDS)})")
