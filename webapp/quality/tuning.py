"""Decision thresholds tuned on labelled scores (numpy only).

The trainer tunes them on its validation split; the site re-tunes them from reviewed predictions
(:mod:`webapp.quality.live`). Both use these functions, so a threshold means the same thing in either place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)


def f1_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from counts, 0 where there is nothing to count."""
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def micro_counts(
    probabilities: np.ndarray, targets: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> tuple[int, int, int]:
    """Summed true positives, false positives and false negatives over every label."""
    predicted = probabilities >= np.asarray(thresholds)[None, :]
    positives = targets > 0
    return int((predicted & positives).sum()), int((predicted & ~positives).sum()), int((~predicted & positives).sum())


def micro_f1(probabilities: np.ndarray, targets: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> float:
    tp, fp, fn = micro_counts(probabilities, targets, thresholds)
    return float(f1_score(np.array(tp), np.array(fp), np.array(fn)))


def best_global_threshold(probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """The single threshold with the best micro-F1, and that F1."""
    scores = [micro_f1(probabilities, targets, np.full(targets.shape[1], threshold)) for threshold in GRID]
    best = int(np.argmax(scores))
    return float(GRID[best]), float(scores[best])


def label_thresholds(
    probabilities: np.ndarray, targets: np.ndarray, min_support: int, fallback: Sequence[float]
) -> list[float]:
    """One threshold per label maximising that label's F1 on the grid.

    A label with fewer than ``min_support`` positives keeps its ``fallback`` threshold: tuning on two or three
    examples would fit noise. Ties prefer the grid point closest to the fallback.
    """
    positives = targets > 0
    thresholds = []
    for j in range(targets.shape[1]):
        if positives[:, j].sum() < min_support:
            thresholds.append(float(fallback[j]))
            continue
        predicted = probabilities[:, j][:, None] >= GRID[None, :]
        tp = (predicted & positives[:, j][:, None]).sum(axis=0)
        fp = (predicted & ~positives[:, j][:, None]).sum(axis=0)
        fn = (~predicted & positives[:, j][:, None]).sum(axis=0)
        f1 = f1_score(tp, fp, fn)
        candidates = np.flatnonzero(f1 == f1.max())
        best = candidates[np.argmin(np.abs(GRID[candidates] - fallback[j]))]
        thresholds.append(float(GRID[best]))
    return thresholds


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_support: int) -> tuple[list[float], float]:
    """Per-label thresholds where a label has ``min_support`` positives, the global micro-F1 threshold elsewhere;
    returns them and that global threshold."""
    fallback, _ = best_global_threshold(probabilities, targets)
    return label_thresholds(probabilities, targets, min_support, [fallback] * targets.shape[1]), fallback
