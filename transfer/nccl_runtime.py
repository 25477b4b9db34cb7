"""The CUDA side of the nccl transport: CuPy's NCCL bindings plus torch streams and events.

Kept apart from transfer/nccl.py so the transport's bookkeeping can run on CPU against a fake
runtime in tests. CuPy is imported lazily: without a GPU, ``import cupy`` may work while
``cupy.cuda.nccl`` is an empty stub (``nccl.available`` is False).
"""
from __future__ import annotations

from typing import Any, ContextManager, Protocol

import torch

UNAVAILABLE = "nccl needs CUDA and cupy with NCCL"


class Communicator(Protocol):
    """What the transport uses of ``cupy.cuda.nccl.NcclCommunicator``."""

    def send(self, sendbuf: int, count: int, datatype: int, peer: int, stream: int) -> None: ...
    def recv(self, recvbuf: int, count: int, datatype: int, peer: int, stream: int) -> None: ...
    def check_async_error(self) -> None: ...
    def abort(self) -> None: ...
    def destroy(self) -> None: ...


class NcclRuntime(Protocol):
    """Everything device-specific the transport does; tests substitute a CPU fake."""

    uint8: int  # NCCL datatype of raw bytes

    def unique_id(self) -> tuple[int, ...]: ...
    def communicator(self, unique_id: tuple[int, ...], rank: int, device: torch.device) -> Communicator: ...
    def group_start(self) -> None: ...
    def group_end(self) -> None: ...
    def on_device(self, device: torch.device) -> ContextManager: ...
    def side_stream(self, device: torch.device) -> Any: ...  # has ``cuda_stream`` (a pointer)
    def after_compute(self, stream: Any, device: torch.device) -> None: ...
    def record(self, stream: Any) -> Any: ...  # an event with ``query() -> bool``


def unavailable_reason() -> str | None:
    """Why the nccl transport cannot run in this process, or None if it can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or CUDA library errors while importing
        return f"cannot import cupy.cuda.nccl ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        return "this cupy has no NCCL (cupy.cuda.nccl.available is False)"
    return None


def check_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{UNAVAILABLE}: {reason}")


class CupyRuntime:
    """The real runtime: ``cupy.cuda.nccl`` communicators on torch side streams."""

    def __init__(self) -> None:
        check_available()
        from cupy.cuda import nccl

        self._nccl = nccl
        self.uint8 = nccl.NCCL_UINT8
        self._streams: dict[int, torch.cuda.Stream] = {}

    def unique_id(self) -> tuple[int, ...]:
        return self._nccl.get_unique_id()

    def communicator(self, unique_id: tuple[int, ...], rank: int, device: torch.device) -> Communicator:
        import cupy

        with cupy.cuda.Device(_index(device)):  # NCCL binds the communicator to the current device
            return self._nccl.NcclCommunicator(2, unique_id, rank)

    def group_start(self) -> None:
        self._nccl.groupStart()

    def group_end(self) -> None:
        self._nccl.groupEnd()

    def on_device(self, device: torch.device) -> ContextManager:
        return torch.cuda.device(_index(device))

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = _index(device)
        if index not in self._streams:  # transfers overlap the compute stream's model steps
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def after_compute(self, stream: torch.cuda.Stream, device: torch.device) -> None:
        # The source's KV was written by kernels on the compute stream; the destination's blocks
        # may still be read by a step launched before they were reserved.
        stream.wait_stream(torch.cuda.current_stream(_index(device)))

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
