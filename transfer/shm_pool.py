"""A KV pool in POSIX shared memory: one file in /dev/shm per instance, readable by its peers.

File layout (all integers native 64-bit, the pool page-aligned so tensors over it are aligned)::

    0    magic "TKVPOOL1"
    8    num_slots | pool_offset | pool_nbytes | creator pid      (u64 each)
    64   slots: int64[num_slots]      export epochs, 0 = free (see transfer/shm.py)
    pool_offset  the cache tensor's bytes, pool_nbytes of them

The owner creates the file with O_EXCL, reserves its pages up front (``posix_fallocate``: a full
/dev/shm fails here with a clear error instead of SIGBUS on first touch mid-serving) and unlinks
it on ``unlink()``, on garbage collection and at interpreter exit. A process killed with SIGKILL
runs none of those, so names carry the creator's pid and every new pool first sweeps files of
dead creators with the same tag (the tag is the Ray node, whose workers share a pid namespace).
Unlinking never disturbs existing mappings: a peer keeps reading until it drops its mapping.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import weakref
from math import prod
from pathlib import Path

import numpy as np
import torch

from tandem.transfer.blockcopy import raw_dtype

SHM_DIR = Path("/dev/shm")
PREFIX = "tandem-kv"
MAGIC = b"TKVPOOL1"
HEADER_BYTES = 64
# Map page tables up front, once per pool and process: otherwise the first copy out of every page of
# a peer's pool takes a page fault, which slows a transfer down (benchmarks/RESULTS.md).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_NAME = re.compile(rf"{PREFIX}-([0-9a-z]+)-(\d+)-[0-9a-f]+")


def pool_tag(node_id: str) -> str:
    """A short, file-name-safe tag for a node (Ray node ids are hex)."""
    tag = re.sub(r"[^0-9a-z]", "", node_id.lower())[:12]
    return tag or "local"


def _align(n: int, to: int = mmap.PAGESIZE) -> int:
    return -(-n // to) * to


def pid_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (killed, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no procfs: trust kill(0)
        return True


def sweep_orphans(directory: Path = SHM_DIR, tag: str | None = None) -> list[str]:
    """Unlink pools (of ``tag``, or any) whose creating process is gone; returns their names."""
    removed = []
    for entry in os.scandir(directory):
        match = _NAME.fullmatch(entry.name)
        if match is None or (tag is not None and match[1] != tag) or pid_alive(int(match[2])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:  # another sweeper got there first
            pass
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedPool:
    """The owner's side: a zero-filled cache tensor of ``shape``/``dtype`` in a new shm file."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, num_slots: int,
                 tag: str = "local", directory: Path = SHM_DIR) -> None:
        sweep_orphans(directory, tag)
        self.name = f"{PREFIX}-{tag}-{os.getpid()}-{secrets.token_hex(6)}"
        self.path = Path(directory) / self.name
        pool_nbytes = prod(shape) * dtype.itemsize
        pool_offset = _align(HEADER_BYTES + 8 * num_slots)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._finalizer = weakref.finalize(self, _unlink, str(self.path))  # also runs at exit
        try:
            _reserve(fd, pool_offset + pool_nbytes, directory)
            self._mmap = mmap.mmap(fd, pool_offset + pool_nbytes, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(fd)
        self._mmap[:8] = MAGIC
        np.frombuffer(self._mmap, np.uint64, count=4, offset=8)[:] = (
            num_slots, pool_offset, pool_nbytes, os.getpid())
        self.slots = np.frombuffer(self._mmap, np.int64, count=num_slots, offset=HEADER_BYTES)
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=pool_nbytes, offset=pool_offset)
        self.tensor = flat.view(dtype).view(shape)

    def unlink(self) -> None:
        """Remove the name; mappings (ours, peers') stay valid until dropped. Idempotent."""
        self._finalizer()


def _reserve(fd: int, size: int, directory: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        stat = os.statvfs(directory)
        free = stat.f_bavail * stat.f_frsize
        raise OSError(exc.errno, f"cannot reserve {size / 2**20:.1f} MiB of shared memory in "
                                 f"{directory} for the KV pool ({free / 2**20:.1f} MiB free): "
                                 f"{exc.strerror}; enlarge it (docker --shm-size) or use "
                                 f"transfer backend 'ray'") from exc


class PeerPool:
    """A read-only mapping of another instance's pool, found by name."""

    def __init__(self, name: str, directory: Path = SHM_DIR) -> None:
        if _NAME.fullmatch(name) is None:  # names come from messages: never a path
            raise ValueError(f"not a KV pool name: {name!r}")
        self.name = name
        self.path = Path(directory) / name
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if size < HEADER_BYTES or self._mmap[:8] != MAGIC:
            raise ValueError(f"{self.path} is not a KV pool")
        num_slots, offset, nbytes, self.creator_pid = (
            int(x) for x in np.frombuffer(self._mmap, np.uint64, count=4, offset=8))
        if offset + nbytes > size:
            raise ValueError(f"{self.path} is truncated ({size} < {offset + nbytes} bytes)")
        self.slots = np.frombuffer(self._mmap, np.int64, count=num_slots, offset=HEADER_BYTES)
        self._bytes = np.frombuffer(self._mmap, np.uint8, count=nbytes, offset=offset)
        self._view: tuple | None = None

    def blocks(self, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        """The pool as a read-only raw-integer array of the owner's cache shape (cached)."""
        if self._view is None or self._view[0] != (shape, dtype):
            if prod(shape) * dtype.itemsize != self._bytes.size:
                raise ValueError(f"pool {self.name} holds {self._bytes.size} bytes, not a "
                                 f"{shape} {dtype} cache")
            self._view = ((shape, dtype), self._bytes.view(raw_dtype(dtype)).reshape(shape))
        return self._view[1]

    def is_live(self, slot: int, epoch: int) -> bool:
        return 0 <= slot < self.slots.size and int(self.slots[slot]) == epoch

    def exists(self) -> bool:
        """Whether the owner still publishes the pool (it unlinks it when it shuts down)."""
        return self.path.exists()
