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
