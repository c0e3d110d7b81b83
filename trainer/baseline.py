"""The bar the model has to clear: TF-IDF (1-2 grams) + one-vs-rest logistic regression."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from webapp.quality.tuning import best_global_threshold

from .metrics import product_report

DESCRIPTION = "tfidf-1-2gram + one-vs-rest logistic regression (C=10), global threshold tuned on validation"


def tfidf_baseline(
    texts: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    negatives: dict[str, np.ndarray],
    report_on: tuple[str, ...] = ("test", "newest"),
) -> dict[str, Any]:
    """Fit on train, tune one global threshold on validation, report on each split of ``report_on`` that has
    papers (same labels and splits as the model). Answers as the baseline would: no best guess when nothing
    passes (``with_best_guess`` gives the same scores with one, for a like-for-like reading)."""
    train_targets = targets["train"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True)
    x_train = vectorizer.fit_transform(texts["train"])
    # Labels without a positive (or without a negative) in train cannot be fitted; they score zero.
    fitted = np.flatnonzero((train_targets.sum(axis=0) > 0) & (train_targets.sum(axis=0) < len(train_targets)))
    classifier = OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=1000), n_jobs=1)
    classifier.fit(x_train, train_targets[:, fitted])

    def probabilities(split: str) -> np.ndarray:
        scores = np.zeros((len(texts[split]), train_targets.shape[1]), dtype=np.float32)
        if texts[split]:
            scores[:, fitted] = classifier.predict_proba(vectorizer.transform(texts[split]))
        return scores

    threshold, _ = best_global_threshold(probabilities("validation"), targets["validation"])
    thresholds = [threshold] * train_targets.shape[1]
    result: dict[str, Any] = {"model": DESCRIPTION, "threshold": threshold}
    for split in report_on:
        if texts.get(split):
            scores = probabilities(split)
            result[split] = product_report(
                scores, targets[split], thresholds, best_guess=False, negatives=negatives[split]
            )
            guessed = product_report(scores, targets[split], thresholds, best_guess=True, negatives=negatives[split])
            result[split]["with_best_guess"] = {k: guessed[k] for k in ("micro_f1", "macro_f1", "empty_share")}
    return result
