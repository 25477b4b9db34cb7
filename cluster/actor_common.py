"""Pieces every instance actor shares: thread limits, the engine, awaiting the step loop."""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from pathlib import Path

from engine.engine import Engine, EngineConfig


def build_engine(model_dir: str, config: EngineConfig, num_threads: int) -> Engine:
    # Several actors share the host's cores: spinning OpenMP threads would starve each other.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(max(1, num_threads))
    return Engine(Path(model_dir), config)


async def on_loop(future: Future, timeout_s: float = 60.0):
    """Await a StepLoop call from the actor's event loop, bounded."""
    return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
