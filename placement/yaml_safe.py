"""YAML without aliases, for every spec tandem reads. An alias (``*name``) makes the composer reuse
the anchored node, so a few lines can expand to billions of values (an alias bomb) or to a value
that contains itself; specs never need them, so they are refused before anything is constructed."""
from __future__ import annotations

from typing import Any

import yaml

ALIASES_REFUSED = "YAML aliases (*name) are not supported in specs: write the value out"


def alias_in(node: yaml.Node | None) -> tuple[str, ...] | None:
    """Key path of the first node reached twice in document order (an alias), or None."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [] if node is None else [(node, ())]
    while stack:
        current, path = stack.pop()
        if id(current) in seen:
            return path
        seen.add(id(current))
        children: list[tuple[yaml.Node, tuple[str, ...]]] = []
        if isinstance(current, yaml.SequenceNode):
            children = [(item, path + (str(i),)) for i, item in enumerate(current.value)]
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                children.append((value, path + (name,)))
        stack.extend(reversed(children))  # pop in document order
    return None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing aliases: ValueError naming where the first one is."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        path = alias_in(node)
        if path is not None:
            raise ValueError(f"{'.'.join(path) or 'the document'}: {ALIASES_REFUSED}")
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()
