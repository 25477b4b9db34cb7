"""tandem's in-process model runtime: models, paged KV cache, scheduler, sampler, step loop.

No Ray and no network here; the prefill/decode instances and the colocated baseline build on it.
The public names load lazily so that light submodules (``tandem.engine.prepare``,
``tandem.engine.params``) can be imported without pulling in torch.
"""
from __future__ import annotations

from tandem.engine.lazy import lazy_attributes

PUBLIC = {
    "LLM": "tandem.engine.llm",
    "SamplingParams": "tandem.engine.params",
    "Completion": "tandem.engine.outputs",
    "TokenDelta": "tandem.engine.outputs",
}
__all__ = list(PUBLIC)

__getattr__ = lazy_attributes(__name__, PUBLIC)
