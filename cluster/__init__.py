"""The disaggregated cluster: spec, launcher, router, client handle.

``Cluster``, ``connect`` and ``Client`` load lazily, so ``tandem.cluster.spec`` stays importable
without Ray or torch.
"""
from __future__ import annotations

from tandem.engine.lazy import lazy_attributes

PUBLIC = {"Cluster": "tandem.cluster.launcher", "connect": "tandem.cluster.launcher",
           "Client": "tandem.cluster.client"}
__all__ = list(PUBLIC)

__getattr__ = lazy_attributes(__name__, PUBLIC)
