"""Per-label decision thresholds tuned on the validation split: how much evidence a label needs for its own.

The tuning itself lives in :mod:`webapp.tuning`, shared with the site's thresholds learned from reviews.
"""

from __future__ import annotations

import numpy as np

from webapp.tuning import micro_f1, tune_thresholds

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
