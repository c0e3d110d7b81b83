"""How deeply a parsed JSON value nests, measured without recursion: request bodies and bundle manifests are
refused past a depth, and Python's own recursion would fail first on hostile input (100,000 ``[``)."""

from __future__ import annotations

from typing import Any


def json_depth(value: Any, limit: int | None = None) -> int:
    """Nesting depth of lists and objects in ``value`` (a scalar is 0); stops once it is past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack and (limit is None or deepest <= limit):
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest
