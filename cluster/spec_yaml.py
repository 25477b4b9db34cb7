"""Reading a spec file: YAML to plain data, plus the line of every key so that errors found later
(during validation) can point into the file. Duplicate keys are errors: PyYAML would silently keep
the last one, which hides typos such as two ``decode:`` sections. Aliases are refused before
anything is constructed (placement/yaml_safe.py says why)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tandem.cluster.spec_types import SpecError
from tandem.placement.yaml_safe import ALIASES_REFUSED, alias_in

KeyPath = tuple[str, ...]


def read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path`; returns the data and a map from key path to its 1-based line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("", f"cannot read spec: {exc.strerror or exc}", str(path)) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        alias = alias_in(node)  # first: a node containing itself would recurse forever below
        if alias is not None:
            raise SpecError(".".join(alias), ALIASES_REFUSED, str(path))
        lines: dict[KeyPath, int] = {}
        _index(node, (), lines, path)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, path) from None
    except yaml.YAMLError as exc:
        raise SpecError("", f"invalid YAML: {exc}", str(path)) from None
    finally:
        loader.dispose()


def line_of(field: str, lines: dict[KeyPath, int]) -> int | None:
    """Line of the dotted `field`, or of its nearest ancestor present in the file (a missing key is
    best reported at its enclosing section)."""
    parts = tuple(field.split(".")) if field else ()
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


def _syntax_error(exc: yaml.MarkedYAMLError, path: Path) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    reason = f"invalid YAML: {exc.problem or 'syntax error'}"
    if exc.context:
        reason += f" ({exc.context})"
    return SpecError("", reason, where)


def _index(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], path: Path) -> None:
    """Record each mapping key's line under `prefix`; refuse duplicate keys."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, prefix + (str(i),), lines, path)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # a complex key fails type checks later, with its own message
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in seen:
            field = ".".join(prefix + (key,))
            raise SpecError(field, f"duplicate key (first at line {seen[key]})", f"{path}:{line}")
        seen[key] = line
        lines[prefix + (key,)] = line
        _index(value_node, prefix + (key,), lines, path)
