"""What a parsed JSON value may hold to be stored and answered again, checked without recursion (Python's own would
fail first on hostile input, 100,000 ``[``): bounded nesting, text with no NUL character (PostgreSQL refuses it) and
no unpaired surrogate (it cannot be written as UTF-8), and numbers that are finite and fit 64 bits."""

from __future__ import annotations

import math
from typing import Any, NoReturn

INT_LIMIT = 2**63  # what a database's BIGINT holds


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


def no_constant(name: str) -> NoReturn:
    """``parse_constant`` for ``json.loads``: NaN and Infinity are Python's extension, not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is, or None."""
    if "\x00" in text:
        return "holds a NUL character"
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return "holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode text"
    return None


def json_problem(value: Any, max_depth: int) -> str | None:
    """The first reason ``value`` (as ``json.loads`` made it) cannot be accepted, naming where it is
    (``targets[0].keywords[1]``), or None."""
    if json_depth(value, max_depth) > max_depth:
        return f"it nests deeper than {max_depth} levels"
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, where = stack.pop()
        problem = None
        if isinstance(node, dict):
            bad_keys = [text_problem(key) for key in node if text_problem(key)]
            if bad_keys:
                problem = f"has a key that {bad_keys[0]}"
            stack.extend((child, f"{where}.{key}" if where else key) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
        elif isinstance(node, str):
            problem = text_problem(node)
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int) and not -INT_LIMIT <= node < INT_LIMIT:
            problem = "is a number out of range (past 64 bits)"
        elif isinstance(node, float) and not math.isfinite(node):
            problem = "is a number that is not finite"
        if problem:
            return f"{_shortened(where)} {problem}" if where else f"the body {problem}"
    return None


def _shortened(where: str) -> str:
    return where if len(where) <= 80 else f"{where[:77]}..."
