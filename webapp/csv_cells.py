"""Every CSV the site writes goes through :func:`csv_lines`, which neutralises formula-like cells (issue 11, point 5).

Titles, abstracts, notes, labels and uploaded columns come from anonymous or outside users and end up in curators'
spreadsheets; a cell such as ``=HYPERLINK(...)`` or ``=cmd|...`` would run there. OWASP's rule: a text cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``, which spreadsheets read as
"this is text" and do not show. Numbers stay numbers: ints and floats are left alone, and so is text that is only
a number (``-0.5``, ``+3``, ``1e-4``), which no spreadsheet evaluates as a formula.

The ``defusedcsv`` package does a similar job but misses tab and CR, rewrites every ``|`` (the site's label
separator) in the cells it touches and quotes negative numbers, so this module keeps the rule in a few lines.
The JSON Lines exports carry the text unchanged, for programs.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def safe_cell(value: Any) -> Any:
    """``value``, or ``'`` + ``value`` when it is text a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_lines(rows: Iterable[Iterable[Any]], delimiter: str = ",") -> Iterator[str]:
    """Each row as one CSV line (Excel dialect, ``delimiter`` between cells), every cell through :func:`safe_cell`,
    for streaming responses."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    for row in rows:
        writer.writerow([safe_cell(cell) for cell in row])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
