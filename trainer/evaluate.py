"""Metrics of any bundle on any labelled file, computed through the server's inference code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from webapp.serving.inference import LoadedModel

from . import metrics
from .data import Paper, multi_hot, read_papers


def evaluate_bundle(bundle_dir: Path, data_file: Path, fields: dict[str, str] | None = None) -> dict[str, Any]:
    return {"data": str(data_file), **evaluate_papers(bundle_dir, read_papers(data_file, fields))}


def served_outputs(model: LoadedModel, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and domain similarities as the server computes them (windows, head, fusion)."""
    logits, domain = model.head_outputs(texts, model.encoder.run(texts))
    return 1 / (1 + np.exp(-logits.astype(np.float64))), domain


def evaluate_papers(bundle_dir: Path, papers: list[Paper]) -> dict[str, Any]:
    """What the product shows (best guesses and off-domain flags included) scored against the papers' labels;
    labels outside the bundle's label set are ignored (counted as ``unknown_labels``); a paper with an empty label
    list is a true negative."""
    model = LoadedModel(bundle_dir, threads=os.cpu_count() or 1)
    probabilities, domain = served_outputs(model, [p.text for p in papers])
    known = set(model.labels)
    unknown = sorted({label for p in papers for label in p.labels} - known)
    targets = multi_hot(papers, model.labels)
    report = metrics.product_report(
        probabilities,
        targets,
        model.manifest.thresholds,
        best_guess=model.manifest.best_guess,
        guess_floor=model.manifest.guess_floor,
        domain=domain,
        domain_threshold=model.manifest.domain_threshold,
        negatives=np.asarray([not p.labels for p in papers], dtype=bool),
    )
    per_label = metrics.full_report(probabilities, targets, model.manifest.thresholds, model.labels)
    return {
        "bundle": str(bundle_dir),
        "taxonomy": model.manifest.taxonomy_slug,
        "unknown_labels": len(unknown),
        **report,
        "per_label": per_label["per_label"],
        "macro_roc_auc": per_label["macro_roc_auc"],
    }
