"""Timing helpers shared by the bench scripts (figures are ratios against a baseline measured in the same run)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(rounds: int, work: Callable[[], object]) -> float:
    """The fastest of ``rounds`` runs, in seconds: the least disturbed by a busy shared machine."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)
