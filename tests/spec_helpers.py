"""Helpers for the cluster-spec tests (tests/unit/test_spec*.py): a minimal valid spec, dotted
edits of it, and the assertion that a spec error names its field first."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tandem.cluster.spec import SpecError, parse_spec

# Shaped like a small GQA model: 8 query heads, 4 KV heads, 6 layers.
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8,
               "num_key_value_heads": 4, "num_hidden_layers": 6, "hidden_size": 64}


def write_model_config(directory: Path, config: dict[str, Any] = TINY_CONFIG) -> Path:
    """A model directory holding only config.json: enough for the spec's model-aware checks."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def base(model_dir: Path | None = None) -> dict[str, Any]:
    """A minimal valid disaggregated spec; by path when `model_dir` is given (model-aware checks
    run), else by a name no machine has prepared (model-aware checks are skipped)."""
    model = {"path": str(model_dir)} if model_dir else {"name": "no-such-model"}
    return {"name": "test", "model": model, "prefill": {"device": "cpu"}, "decode": {"device": "cpu"}}


def with_value(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Copy of `data` with the dotted key set (intermediate mappings created as needed)."""
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def expect_error(data: dict[str, Any], field: str, *fragments: str, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}: "), message
    assert info.value.field == field
    for fragment in fragments:
        assert fragment in message, message
    return info.value
