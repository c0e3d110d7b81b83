"""What a parsed JSON value may hold to be stored and answered again, checked without recursion (Python's own would
fail first on hostile input, 100,000 ``[``): bounded nesting, text with no NUL character (PostgreSQL refuses it) and
no unpaired surrogate (it cannot be written as UTF-8), and numbers that are finite and fit 64 bits."""

from __future__ import annotations

import math
from typing import Any, NoReturn

INT_LIMIT = 2**63  # what a database's BIGINT holds


def no_constant(name: str) -> NoReturn:
    """``parse_constant`` for ``json.loads``: NaN and Infinity are Python's extension, not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is, or None (C speed: ``isascii`` reads a flag, ``in`` is a memchr, and
    only text beyond ASCII is encoded)."""
    if "\x00" in text:
        return "holds a NUL character"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode text"
    return None


class UnstorableJSON(ValueError):
    """Valid JSON holding what cannot be stored and answered again."""


def check_json(value: Any, max_depth: int) -> None:
    """Raise when ``value`` (as ``json.loads`` made it) cannot be accepted: ValueError when it nests deeper than
    ``max_depth``, :class:`UnstorableJSON` naming where the value is (``targets[0].keywords[1] holds a NUL
    character``; an object's or list's own values are checked before those nested in them). One pass, in memory
    proportional to the value: scalars are checked where they stand and a path is spelled out only for the problem
    found (spelling every item's path cost a key's length per item: 1 GB for a 90 KB body). A 2 MB body of many small
    values takes 4-8x ``json.loads``'s time, one long text about none more (bench/hostile_input.py)."""
    root = (value, 0, None, None)  # an entry: (node, its nesting level, its parent's entry, its key or index there)
    if type(value) not in (dict, list):
        _check_scalar(value, root)
    stack = [root]
    while stack:
        entry = stack.pop()
        node, level = entry[0], entry[1]
        if level >= max_depth:
            raise ValueError(f"it nests deeper than {max_depth} levels")
        if type(node) is dict:
            for key in node:
                problem = text_problem(key)
                if problem:
                    raise UnstorableJSON(_where(entry, f"has a key that {problem}"))
            items = node.items()
        else:
            items = enumerate(node)
        nested = []
        for key, child in items:
            kind = type(child)
            if kind is dict or kind is list:
                nested.append((child, level + 1, entry, key))
            elif kind is str or kind is int or kind is float:
                _check_scalar(child, (child, level + 1, entry, key))
        stack.extend(reversed(nested))


def _check_scalar(value: Any, entry: tuple) -> None:
    kind = type(value)
    if kind is str:
        problem = text_problem(value)
        if problem:
            raise UnstorableJSON(_where(entry, problem))
    elif kind is int:
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise UnstorableJSON(_where(entry, "is a number out of range (past 64 bits)"))
    elif kind is float and not math.isfinite(value):
        raise UnstorableJSON(_where(entry, "is a number that is not finite"))


def _where(entry: tuple, problem: str) -> str:
    path = _path(entry)
    return f"{path} {problem}" if path else f"the body {problem}"


def _path(entry: tuple) -> str:
    """``a.b[2].c`` for an entry of :func:`check_json`'s walk, each key cut to 40 characters, the whole to 80."""
    parts: list[str] = []
    while entry[2] is not None:
        key = entry[3]
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key[:40]}")
        entry = entry[2]
    path = "".join(reversed(parts)).removeprefix(".")
    return path if len(path) <= 80 else f"{path[:77]}..."
