"""tandem: LLM serving with prefill and decode disaggregated onto separate pools of Ray actors.

The repository's top-level folders install as this one package (``tandem.engine``, ``tandem.cluster``,
...). The public names load lazily, so ``import tandem`` pulls in neither torch nor Ray.
"""
from __future__ import annotations

from tandem import cluster, engine
from tandem.engine.lazy import lazy_attributes

_PUBLIC = {**engine.PUBLIC, **cluster.PUBLIC}  # the engine's names and the cluster's
__all__ = list(_PUBLIC)

__getattr__ = lazy_attributes(__name__, _PUBLIC)
