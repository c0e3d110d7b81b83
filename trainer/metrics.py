"""Evaluation metrics written into bundle.json (scikit-learn does the arithmetic)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import f1_score, precision_recall_curve, precision_recall_fscore_support, roc_auc_score

PR_CURVE_POINTS = 11


def decide(probabilities: np.ndarray, thresholds: list[float] | np.ndarray) -> np.ndarray:
    return (probabilities >= np.asarray(thresholds, dtype=np.float32)[None, :]).astype(int)


def summary(probabilities: np.ndarray, targets: np.ndarray, thresholds: list[float] | np.ndarray) -> dict[str, float]:
    """Micro/macro F1, precision and recall: the figures compared between models."""
    predicted = decide(probabilities, thresholds)
    truth = targets.astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
        macro = f1_score(truth, predicted, average="macro", zero_division=0)
    return {
        "micro_f1": round(float(f), 4),
        "micro_precision": round(float(p), 4),
        "micro_recall": round(float(r), 4),
        "macro_f1": round(float(macro), 4),
        "examples": int(len(truth)),
    }


def _curve(truth: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """A few precision/recall points per label, evenly spaced in recall, small enough for bundle.json."""
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    picks = np.unique(np.linspace(0, len(thresholds) - 1, PR_CURVE_POINTS).round().astype(int))
    return {
        "threshold": [round(float(thresholds[i]), 4) for i in picks],
        "precision": [round(float(precision[i]), 4) for i in picks],
        "recall": [round(float(recall[i]), 4) for i in picks],
    }


def full_report(
    probabilities: np.ndarray, targets: np.ndarray, thresholds: list[float] | np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Summary plus per-label precision/recall/F1/support, ROC-AUC and precision-recall curve points."""
    report: dict[str, Any] = summary(probabilities, targets, thresholds)
    predicted = decide(probabilities, thresholds)
    truth = targets.astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    per_label: dict[str, Any] = {}
    aucs = []
    for j, label in enumerate(labels):
        entry: dict[str, Any] = {
            "precision": round(float(p[j]), 4),
            "recall": round(float(r[j]), 4),
            "f1": round(float(f[j]), 4),
            "support": int(support[j]),
            "threshold": float(thresholds[j]),
        }
        if 0 < support[j] < len(truth):
            auc = float(roc_auc_score(truth[:, j], probabilities[:, j]))
            aucs.append(auc)
            entry["roc_auc"] = round(auc, 4)
            entry["pr_curve"] = _curve(truth[:, j], probabilities[:, j])
        per_label[label] = entry
    report["macro_roc_auc"] = round(float(np.mean(aucs)), 4) if aucs else None
    report["per_label"] = per_label
    return report


def decisions(
    probabilities: np.ndarray,
    thresholds: list[float] | np.ndarray,
    *,
    best_guess: bool,
    off_domain: np.ndarray | None = None,
    guess_floor: float = 0.0,
) -> np.ndarray:
    """What the product shows, as a 0/1 matrix: labels at or above their threshold; where none passes and
    ``best_guess`` is on, the most probable label, if it reaches ``guess_floor`` and the abstract is not flagged
    off-domain (:meth:`webapp.serving.inference.LoadedModel.decide`)."""
    predicted = decide(probabilities, thresholds)
    if best_guess and len(predicted):
        empty = (predicted.sum(axis=1) == 0) & (probabilities.max(axis=1) >= guess_floor)
        if off_domain is not None:
            empty &= ~off_domain
        rows = np.flatnonzero(empty)
        predicted[rows, np.argmax(probabilities[rows], axis=1)] = 1
    return predicted


def product_report(
    probabilities: np.ndarray,
    targets: np.ndarray,
    thresholds: list[float] | np.ndarray,
    *,
    best_guess: bool,
    domain: np.ndarray | None = None,
    domain_threshold: float | None = None,
    negatives: np.ndarray | None = None,
    guess_floor: float = 0.0,
) -> dict[str, Any]:
    """The figures that say how the tags serve people, on one split:

    - micro/macro F1 of what is shown (best guesses included) and of the thresholded labels alone;
    - ``empty_share``: in-scope papers (at least one gold label) shown no label at all;
    - ``negative_fp_rate``: label-free papers (``negatives``: true negatives, not papers whose labels were all
      dropped as too rare) shown a label;
    - ``hit_at_1/3/5``: single-label papers whose label is among the 1/3/5 highest scores;
    - ``off_domain_share``: papers flagged as unlike the training papers.
    """
    off_domain = None
    if domain is not None and domain_threshold is not None:
        off_domain = domain < domain_threshold
    shown = decisions(probabilities, thresholds, best_guess=best_guess, off_domain=off_domain, guess_floor=guess_floor)
    truth = targets.astype(int)
    in_scope = truth.sum(axis=1) > 0
    negatives = np.zeros(len(truth), dtype=bool) if negatives is None else np.asarray(negatives, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        p, r, f, _ = precision_recall_fscore_support(truth, shown, average="micro", zero_division=0)
        macro = f1_score(truth, shown, average="macro", zero_division=0)
        samples = (
            f1_score(truth[in_scope], shown[in_scope], average="samples", zero_division=0) if in_scope.any() else 0
        )
    report: dict[str, Any] = {
        "micro_f1": round(float(f), 4),
        "micro_precision": round(float(p), 4),
        "micro_recall": round(float(r), 4),
        "macro_f1": round(float(macro), 4),
        "samples_f1": round(float(samples), 4),
        "examples": int(len(truth)),
        "in_scope": int(in_scope.sum()),
        "empty_share": round(float((shown[in_scope].sum(axis=1) == 0).mean()), 4) if in_scope.any() else None,
        "negatives": int(negatives.sum()),
        "negative_fp_rate": round(float((shown[negatives].sum(axis=1) > 0).mean()), 4) if negatives.any() else None,
        "best_guess": best_guess,
    }
    if best_guess:
        report["thresholded_only"] = summary(probabilities, targets, thresholds)
    single = np.flatnonzero(truth.sum(axis=1) == 1)
    report["single_label"] = int(len(single))
    if len(single):
        gold = truth[single].argmax(axis=1)
        rank = (probabilities[single] > probabilities[single, gold][:, None]).sum(axis=1)
        for k in (1, 3, 5):
            report[f"hit_at_{k}"] = round(float((rank < k).mean()), 4)
    if off_domain is not None:
        report["off_domain_share"] = round(float(off_domain.mean()), 4)
    return report
