"""Metrics of any bundle on any labelled file, computed through the server's inference code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from webapp.inference import LoadedModel

from . import metrics
from .data import Paper, multi_hot, read_papers


def evaluate_bundle(bundle_dir: Path, data_file: Path) -> dict[str, Any]:
    return {"data": str(data_file), **evaluate_papers(bundle_dir, read_papers(data_file))}


def evaluate_papers(bundle_dir: Path, papers: list[Paper]) -> dict[str, Any]:
    """Labels outside the bundle's label set are ignored (counted as ``unknown_labels``)."""
    model = LoadedModel(bundle_dir, threads=os.cpu_count() or 1)
    probabilities = 1 / (1 + np.exp(-model.logits([p.text for p in papers])))
    known = set(model.labels)
    unknown = sorted({label for p in papers for label in p.labels} - known)
    report = metrics.full_report(
        probabilities, multi_hot(papers, model.labels), model.manifest.thresholds, model.labels
    )
    return {
        "bundle": str(bundle_dir),
        "taxonomy": model.manifest.taxonomy_slug,
        "unknown_labels": len(unknown),
        **report,
    }
