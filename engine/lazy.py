"""Lazily loaded public names for a package's ``__init__``: ``import tandem`` (or
``tandem.engine``, ``tandem.cluster``) stays light, and each name imports its module on first use."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, public: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving each name in ``public`` from the module it maps to."""
    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(public[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
