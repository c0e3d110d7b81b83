"""Per-label decision thresholds tuned on the validation split."""

from __future__ import annotations

import numpy as np

GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def best_global_threshold(probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """The single threshold with the best micro-F1, and that F1."""
    scores = []
    for threshold in GRID:
        predicted = probabilities >= threshold
        tp = float((predicted & (targets > 0)).sum())
        fp = float((predicted & (targets == 0)).sum())
        fn = float((~predicted & (targets > 0)).sum())
        scores.append(_f1(np.array(tp), np.array(fp), np.array(fn)).item())
    best = int(np.argmax(scores))
    return float(GRID[best]), float(scores[best])


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_support: int) -> tuple[list[float], float]:
    """One threshold per label maximising that label's F1 on validation data.

    A label with fewer than ``min_support`` validation positives gets the global micro-F1 threshold:
    tuning on two or three examples would fit noise. Ties prefer the threshold closest to the global one.
    """
    fallback, _ = best_global_threshold(probabilities, targets)
    positives = targets > 0
    thresholds = []
    for j in range(targets.shape[1]):
        if positives[:, j].sum() < min_support:
            thresholds.append(fallback)
            continue
        predicted = probabilities[:, j][:, None] >= GRID[None, :]
        tp = (predicted & positives[:, j][:, None]).sum(axis=0)
        fp = (predicted & ~positives[:, j][:, None]).sum(axis=0)
        fn = (~predicted & positives[:, j][:, None]).sum(axis=0)
        f1 = _f1(tp, fp, fn)
        candidates = np.flatnonzero(f1 == f1.max())
        best = candidates[np.argmin(np.abs(GRID[candidates] - fallback))]
        thresholds.append(float(GRID[best]))
    return thresholds, fallback


# Evidence levels tried when the config leaves ``threshold_min_support`` at 0 (auto); 0 = one global threshold.
SUPPORT_CHOICES = (4, 8, 16, 32, 0)


def _micro_f1(probabilities: np.ndarray, targets: np.ndarray, thresholds: list[float]) -> float:
    predicted = probabilities >= np.asarray(thresholds)[None, :]
    positives = targets > 0
    tp, fp, fn = (predicted & positives).sum(), (predicted & ~positives).sum(), (~predicted & positives).sum()
    return float(_f1(np.array(tp), np.array(fp), np.array(fn)))


def choose_min_support(probabilities: np.ndarray, targets: np.ndarray, *, repeats: int = 5, seed: int = 0) -> int:
    """How much validation evidence a label needs for its own threshold, chosen by repeated 2-fold
    cross-validation on the validation split (tune on one half, score micro-F1 on the other).

    Per-label thresholds fitted on a handful of positives overfit; this measures where that starts instead of
    guessing. Returns 0 when one global threshold for every label generalises best (ties prefer it).
    """
    rng = np.random.default_rng(seed)
    scores: dict[int, list[float]] = {choice: [] for choice in SUPPORT_CHOICES}
    for _ in range(repeats):
        order = rng.permutation(len(targets))
        halves = order[: len(order) // 2], order[len(order) // 2 :]
        for fit, held in (halves, halves[::-1]):
            for choice in SUPPORT_CHOICES:
                thresholds, _ = tune_thresholds(probabilities[fit], targets[fit], choice or len(targets) + 1)
                scores[choice].append(_micro_f1(probabilities[held], targets[held], thresholds))
    return max(SUPPORT_CHOICES, key=lambda choice: (round(float(np.mean(scores[choice])), 4), choice == 0))
