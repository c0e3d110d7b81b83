"""Per-label decision thresholds tuned on the validation split: how much evidence a label needs for its own.

The tuning itself lives in :mod:`webapp.quality.tuning`, shared with the site's thresholds learned from reviews.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta

from webapp.quality.tuning import GRID, f1_score, label_thresholds, micro_f1, tune_thresholds

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


# Least probabilities a best guess may need, tried on validation (0 = always guess).
FLOOR_GRID = np.round(np.arange(0.0, 0.301, 0.01), 2)
# How sure the choice must be that in-scope papers like the validation ones are left empty at most
# ``max_empty_share`` of the time: a share measured on a few hundred papers is itself uncertain by a point or two.
EMPTY_SHARE_CONFIDENCE = 0.95


def empty_share_bounds(papers: int, confidence: float = EMPTY_SHARE_CONFIDENCE) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds of the share of empty answers, for 0..``papers`` empty ones among
    ``papers``: the true share lies below it with ``confidence``."""
    empty = np.arange(papers + 1)
    with np.errstate(invalid="ignore"):
        bounds = beta.ppf(confidence, empty + 1, papers - empty)
    return np.where(empty == papers, 1.0, bounds)


def guessing_thresholds(
    probabilities: np.ndarray, targets: np.ndarray, min_support: int, max_empty_share: float
) -> tuple[list[float], float, float]:
    """Like :func:`webapp.quality.tuning.tune_thresholds`, for a model that answers its best guess when no label passes.

    The global threshold and the guess floor (a guess needs at least that probability: below it the paper is most
    likely about none of the labels, and a guess would only add a false positive) are chosen together for the
    micro-F1 of what is then shown, among the pairs whose share of in-scope papers (those with a label) left with no
    answer under the global threshold stays at most ``max_empty_share`` with ``EMPTY_SHARE_CONFIDENCE`` (its upper
    bound, :func:`empty_share_bounds`, for each pair on its own), or that leave no in-scope paper empty. The latter
    are always allowed (floor 0, a guess for every paper, is one of them): with fewer than about 60 in-scope papers
    at 5%, or with ``max_empty_share`` 0, they are the only ones. Per-label thresholds (where a label has
    ``min_support`` positives) and off-domain flags, applied afterwards, can leave a few more empty (the bundle's
    validation figures say how many). Returns the thresholds, the global threshold and the floor.
    """
    positives = targets > 0
    in_scope = positives.any(axis=1)
    bounds = empty_share_bounds(int(in_scope.sum()))
    top = probabilities.argmax(axis=1)
    top_probability = probabilities.max(axis=1)
    best = (-1.0, float(GRID[0]), 0.0)
    for threshold in GRID:
        passing = probabilities >= threshold
        nothing = ~passing.any(axis=1)
        for floor in FLOOR_GRID:
            guessed = np.flatnonzero(nothing & (top_probability >= floor))
            shown = passing.copy()
            shown[guessed, top[guessed]] = True
            empty = int((~shown.any(axis=1))[in_scope].sum())
            if empty and bounds[empty] > max_empty_share:
                continue
            tp, fp, fn = (shown & positives).sum(), (shown & ~positives).sum(), (~shown & positives).sum()
            score = float(f1_score(np.array(tp), np.array(fp), np.array(fn)))
            if score > best[0]:
                best = (score, float(threshold), float(floor))
    _, fallback, floor = best
    return label_thresholds(probabilities, targets, min_support, [fallback] * targets.shape[1]), fallback, floor
