"""Likely label errors (issue 12 point 6): papers whose current labels are probably wrong, ranked by cleanlab's
multi-label label quality over out-of-fold scores, so curators fix the data and not only the predictions.

Out-of-fold scores need a model that never saw the paper it scores. A fine-tune per fold would take hours on a
CPU, so the folds fit only the head, as the served one is built: a logistic regression on the frozen encoder's
pooled readings (which the work dir's cache already holds) fused with TF-IDF + logistic regression: K fits, a minute
or two.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cleanlab.multilabel_classification import get_label_quality_scores
from cleanlab.multilabel_classification.filter import find_label_issues
from sklearn.model_selection import KFold

from webapp.quality.tuning import best_global_threshold
from webapp.serving.bundle import read_manifest
from webapp.surgery import LabelMap

from .config import ConfigError, TrainConfig
from .data import Paper, choose_labels, multi_hot
from .heads import fit_logistic, standardised_head, tfidf_vectorizer
from .train import REPO_ROOT, SPLITS, _encoder_source, _window_manifest, load_dataset, read_abstracts

log = logging.getLogger(__name__)
FOLDS = 5
# The embedding head's strength when the config leaves it to validation: what the shipped research-tasks head chose
# (bundle.json, training.design). One strength for every fold keeps the folds comparable.
DEFAULT_HEAD_C = 0.1
# What bundles trained before the lexical strength was chosen on validation used.
DEFAULT_LEXICAL_C = 10.0
CORRECTION_SOURCE = "correction"
# How cleanlab folds a paper's per-label qualities into one: softmin lets the worst label decide, so one wrong label
# among several right ones sinks the paper (cleanlab's default moving average dilutes it). On bench/label_errors.py's
# seed 0, flips among the first 100: 16 with the default on the embedding head alone, 38 with softmin, 65 with
# softmin and the lexical half fused as served.
AGGREGATOR = {"method": "softmin"}


@dataclass
class Scored:
    """Every paper of a dataset with its out-of-fold probabilities over the kept labels."""

    papers: list[Paper]
    labels: list[str]
    probabilities: np.ndarray  # [papers, labels]
    targets: np.ndarray  # [papers, labels]
    threshold: float  # the global threshold with the best out-of-fold micro-F1


@dataclass
class Lexicon:
    """The lexical half of the out-of-fold model: the texts, the served head's TF-IDF size and strength, and the
    fusion weight the served head chose on validation (logits = w * embedding + (1 - w) * lexical)."""

    texts: list[str]
    max_features: int
    c: float
    encoder_weight: float


def out_of_fold(
    pooled: np.ndarray,
    targets: np.ndarray,
    *,
    folds: int,
    c: float,
    seed: int,
    lexicon: Lexicon | None = None,
) -> np.ndarray:
    """Probabilities for each paper from a head fitted on the other folds only: the embedding head, fused with a
    TF-IDF classifier as the served head is when ``lexicon`` is given."""
    probabilities = np.zeros(targets.shape, dtype=np.float64)
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for number, (fit_rows, score_rows) in enumerate(splitter.split(pooled), start=1):
        head = standardised_head(pooled[fit_rows], targets[fit_rows], c)
        logits = head.logits(pooled[score_rows]).astype(np.float64)
        if lexicon is not None:
            vectorizer = tfidf_vectorizer(lexicon.max_features)
            features = vectorizer.fit_transform([lexicon.texts[i] for i in fit_rows])
            lexical = fit_logistic(features, targets[fit_rows], lexicon.c)
            lexical_logits = lexical.logits(vectorizer.transform([lexicon.texts[i] for i in score_rows]))
            logits = lexicon.encoder_weight * logits + (1 - lexicon.encoder_weight) * lexical_logits
        probabilities[score_rows] = 1 / (1 + np.exp(-logits))
        log.info("fold %d of %d scored", number, folds)
    return probabilities


def served_fusion(config: TrainConfig) -> tuple[float, float]:
    """The fusion weight and lexical strength the frozen encoder's bundle chose on validation (its bundle.json):
    0.5 and ``DEFAULT_LEXICAL_C`` where it does not record them; a lexical_c set in the config wins."""
    source = Path(config.encoder) if Path(config.encoder).is_absolute() else REPO_ROOT / config.encoder
    design = read_manifest(source).metrics.get("training", {}).get("design", {})
    design = design if isinstance(design, dict) else {}
    weight, c = design.get("encoder_weight"), design.get("lexical_c_chosen")
    weight = float(weight) if isinstance(weight, (int, float)) and 0 <= weight <= 1 else 0.5
    c = float(c) if isinstance(c, (int, float)) and c > 0 else DEFAULT_LEXICAL_C
    return weight, config.lexical_c or c


def score_dataset(
    config: TrainConfig,
    corrections: list[Paper] | None = None,
    label_map: LabelMap | None = None,
    *,
    folds: int = FOLDS,
    work_dir: Path | None = None,
) -> Scored:
    """Out-of-fold scores of every paper of ``config``'s data with the corrections merged in (a corrected paper is
    scored under its corrected labels), over the labels the config trains."""
    if not config.frozen_encoder:
        raise ConfigError(
            "label-issues scores on a frozen encoder: use a config with `encoder` set to a bundle folder "
            "(e.g. trainer/configs/research-tasks-heads.json)"
        )
    if folds < 2:
        raise ConfigError("folds must be 2 or more")
    splits, _ = load_dataset(config, corrections, label_map)
    papers = [paper for name in SPLITS for paper in splits[name]]
    if len(papers) < folds:
        raise ConfigError(f"{len(papers)} papers cannot be split into {folds} folds")
    labels, _ = choose_labels(splits["train"], config.min_label_count, config.max_labels)
    targets = multi_hot(papers, labels)
    work_dir = work_dir or REPO_ROOT / "out" / "work"
    encoder_path, tokenizer_path, _, _, base_name, config = _encoder_source(
        config, None, {}, {}, labels, work_dir, lambda update: None
    )
    manifest = _window_manifest(config, labels, base_name)
    texts = {"all": [p.text for p in papers]}
    readings = read_abstracts(config, encoder_path, tokenizer_path, manifest, work_dir, texts)["all"]
    pooled = np.stack([r.pooled for r in readings])
    if config.lexical:
        weight, lexical_c = served_fusion(config)
        lexicon = Lexicon(texts["all"], config.lexical_max_features, lexical_c, weight)
    else:
        lexicon = None
    probabilities = out_of_fold(
        pooled, targets, folds=folds, c=config.head_c or DEFAULT_HEAD_C, seed=config.seed, lexicon=lexicon
    )
    threshold, f1 = best_global_threshold(probabilities, targets)
    log.info("out-of-fold micro-F1 %.4f at threshold %.2f over %d papers", f1, threshold, len(papers))
    return Scored(papers, labels, probabilities, targets, threshold)


def quality_order(scored: Scored) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cleanlab's label quality of every paper (lower = likelier wrong), the papers lowest quality first, and
    whether cleanlab's confident learning flags each as a label issue."""
    given = [list(np.flatnonzero(row)) for row in scored.targets]
    quality = get_label_quality_scores(given, scored.probabilities, aggregator_kwargs=AGGREGATOR)
    flagged = find_label_issues(given, scored.probabilities, n_jobs=1)
    return quality, np.argsort(quality, kind="stable"), flagged


def suggested_labels(probabilities: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    """The labels the out-of-fold model believes: those past the threshold, else its most probable one."""
    chosen = [labels[j] for j in np.flatnonzero(probabilities >= threshold)]
    return sorted(chosen) if chosen else [labels[int(np.argmax(probabilities))]]


def issue_rows(config: TrainConfig, scored: Scored, limit: int) -> list[dict[str, Any]]:
    """The ranked queue as records (lowest quality first): what ``flask labels import-issues`` reads."""
    quality, order, flagged = quality_order(scored)
    source = ", ".join(config.data)
    rows = []
    for rank, i in enumerate(order[:limit] if limit else order, start=1):
        paper = scored.papers[i]
        rows.append(
            {
                "rank": rank,
                "taxonomy": config.taxonomy_slug,
                "id": paper.id,
                "title": paper.title,
                "abstract": paper.abstract,
                "given": sorted(label for label, on in zip(scored.labels, scored.targets[i], strict=True) if on),
                "suggested": suggested_labels(scored.probabilities[i], scored.labels, scored.threshold),
                "quality": round(float(quality[i]), 6),
                "issue": bool(flagged[i]),
                "source": CORRECTION_SOURCE if paper.corrected else f"{source} {paper.id}",
                "threshold": scored.threshold,
                "scores": {
                    label: round(float(p), 4) for label, p in zip(scored.labels, scored.probabilities[i], strict=True)
                },
            }
        )
    return rows


def write_issues(rows: list[dict[str, Any]], out: Path) -> Path:
    """One JSON object a line, written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".tmp")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    staging.replace(out)
    return out
