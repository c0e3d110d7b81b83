"""Per-label decision thresholds tuned on the validation split: how much evidence a label needs for its own.

The tuning itself lives in :mod:`webapp.tuning`, shared with the site's thresholds learned from reviews.
"""

from __future__ import annotations

import numpy as np

from webapp.tuning import GRID, f1_score, label_thresholds, micro_f1, tune_thresholds

# Evidence levels tried when the config leaves ``threshold_min_support`` at 0 (auto); 0 = one global threshold.
SUPPORT_CHOICES = (4, 8, 16, 32, 0)


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
                scores[choice].append(micro_f1(probabilities[held], targets[held], thresholds))
    return max(SUPPORT_CHOICES, key=lambda choice: (round(float(np.mean(scores[choice])), 4), choice == 0))


def guessing_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_support: int) -> tuple[list[float], float]:
    """Like :func:`webapp.tuning.tune_thresholds`, for a model that answers its best guess when no label passes:
    the global threshold is chosen by the micro-F1 of what is then shown (an empty answer is no longer the price
    of a high threshold), per-label thresholds where a label has ``min_support`` positives."""
    positives = targets > 0
    top = probabilities.argmax(axis=1)
    scores = []
    for threshold in GRID:
        shown = probabilities >= threshold
        empty = np.flatnonzero(~shown.any(axis=1))
        shown[empty, top[empty]] = True
        tp, fp, fn = (shown & positives).sum(), (shown & ~positives).sum(), (~shown & positives).sum()
        scores.append(float(f1_score(np.array(tp), np.array(fp), np.array(fn))))
    fallback = float(GRID[int(np.argmax(scores))])
    return label_thresholds(probabilities, targets, min_support, [fallback] * targets.shape[1]), fallback
