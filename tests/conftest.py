"""Shared test setup: offline environment, model fixtures, and the `gpu` marker.

Add fixtures here only when several test directories use them; keep heavy imports inside fixtures.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before anything imports transformers, tokenizers or Ray: tests must never reach a model hub,
# report usage, or fork tokenizer thread pools.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Let a plain `pytest` import `tests.reference` (tandem itself must be pip-installed).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


# --- markers -------------------------------------------------------------------------------------

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is unavailable (torch imported only if such tests exist)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


# --- models --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct prepared as an HF directory (cached across runs in `cache_root()`)."""
    from tandem.engine.prepare import prepare_model

    return prepare_model("smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama (GQA, untied embeddings) with a byte-level tokenizer."""
    from tests.reference import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 (non-zero q/k/v biases) with a byte-level tokenizer."""
    from tests.reference import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models"), "qwen2")
