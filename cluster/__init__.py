"""The disaggregated cluster: spec, launcher, router, client handle.

``Cluster`` and ``connect`` load lazily so ``tandem.cluster.spec`` stays importable without Ray or torch.
"""
from __future__ import annotations

import importlib

_PUBLIC = {"Cluster": "tandem.cluster.launcher", "connect": "tandem.cluster.launcher",
           "Client": "tandem.cluster.client"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tandem.cluster' has no attribute {name!r}")
