"""Replay before promotion: re-score a sample of stored abstracts with a candidate version and with the active
version of its taxonomy, and report what activating the candidate would change (labels gained and lost, per-label
counts, and the reviewed predictions it would now get right or wrong).

Both sides are scored fresh, by the same inference code, on the same texts. Stored results may come from older
versions or thresholds, so comparing the candidate with them would blame it for what earlier models did.

A replay runs inside its request: the sample is capped by ``REPLAY_SAMPLE_SIZE`` and 200 abstracts take seconds
with the default model (``bench/replay_time.py``). Its report is stored so the page shows it without recomputing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, flash, g, jsonify, redirect, render_template, url_for
from flask_login import current_user
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import Conflict, NotFound

from .annotations import current_labels, label_map
from .auth import role_required, token_user_role
from .extensions import db
from .models import AnnotationEvent, ModelVersion, Prediction, PredictionResult, ReplayReport, Taxonomy
from .serving.bundle import BundleError, compose_text
from .serving.inference import LoadedModel
from .serving.registry import get_version, live_models, load_version
from .surgery import LabelMap

bp = Blueprint("replay", __name__)
api_bp = Blueprint("replay_api", __name__, url_prefix="/api/v1")

# Predictions listed by name in a report (changed, now right, now wrong); the counts cover the whole sample.
LISTED = 50


class ReplayError(Conflict):
    """The replay cannot run (the version is already active, or it does not load); nothing is stored."""


@dataclass(frozen=True)
class Sampled:
    prediction: Prediction
    gold: list[str] | None  # a reviewed prediction's current labels, None when nobody reviewed it


def sample(taxonomy: Taxonomy, size: int) -> list[Sampled]:
    """Up to ``size`` stored predictions of the taxonomy: the reviewed ones first (latest corrected first),
    then the newest others."""
    reviewed_ids = list(
        db.session.scalars(
            select(AnnotationEvent.prediction_id)
            .where(AnnotationEvent.taxonomy_id == taxonomy.id)
            .group_by(AnnotationEvent.prediction_id)
            .order_by(func.max(AnnotationEvent.id).desc())
            .limit(size)
        )
    )
    other_ids = list(
        db.session.scalars(
            select(PredictionResult.prediction_id)
            .where(PredictionResult.taxonomy_id == taxonomy.id, PredictionResult.prediction_id.not_in(reviewed_ids))
            .group_by(PredictionResult.prediction_id)
            .order_by(PredictionResult.prediction_id.desc())
            .limit(size - len(reviewed_ids))
        )
    )
    predictions = db.session.scalars(
        select(Prediction)
        .where(Prediction.id.in_(reviewed_ids + other_ids))
        .options(selectinload(Prediction.results), selectinload(Prediction.events))
    )
    by_id = {p.id: p for p in predictions}
    sampled = []
    for prediction_id in reviewed_ids:
        prediction = by_id[prediction_id]
        result = next((r for r in reversed(prediction.results) if r.taxonomy_id == taxonomy.id), None)
        events = [e for e in prediction.events if e.taxonomy_id == taxonomy.id]
        sampled.append(Sampled(prediction, current_labels(result, events)))
    return sampled + [Sampled(by_id[prediction_id], None) for prediction_id in other_ids]


def predicted_sets(model: LoadedModel, texts: list[str], labels_map: LabelMap) -> list[set[str]]:
    """Each text's labels as serving would predict them (``LoadedModel.score``, then its decision), in today's
    label names (label surgery), as the gold labels are."""
    batch_size = current_app.config["INFERENCE_BATCH_SIZE"]
    return [
        set(labels_map.map_labels(model.predicted(scored), text))
        for scored, text in zip(model.score(texts, batch_size=batch_size), texts, strict=True)
    ]


def micro_f1(pairs: list[tuple[set[str], set[str]]]) -> float | None:
    """Micro-F1 of (predicted, gold) pairs; None when there is nothing to count."""
    tp = sum(len(predicted & gold) for predicted, gold in pairs)
    wrong = sum(len(predicted ^ gold) for predicted, gold in pairs)
    return round(2 * tp / (2 * tp + wrong), 4) if tp + wrong else None


def compare(sampled: list[Sampled], active: list[set[str]], candidate: list[set[str]]) -> dict[str, Any]:
    """The report's figures from each sampled prediction's labels under the active and the candidate model."""
    counts: dict[str, Counter[str]] = {
        key: Counter() for key in ("active", "candidate", "gained", "lost", "fixed", "broken")
    }
    changes, now_right, now_wrong = [], [], []
    reviewed_pairs: dict[str, list[tuple[set[str], set[str]]]] = {"active": [], "candidate": []}
    for item, before, after in zip(sampled, active, candidate, strict=True):
        counts["active"].update(before)
        counts["candidate"].update(after)
        counts["gained"].update(after - before)
        counts["lost"].update(before - after)
        entry = {
            "id": item.prediction.id,
            "title": item.prediction.title or item.prediction.abstract[:80],
            "active": sorted(before),
            "candidate": sorted(after),
        }
        if before != after:
            changes.append(entry | {"gained": sorted(after - before), "lost": sorted(before - after)})
        if item.gold is None:
            continue
        gold = set(item.gold)
        reviewed_pairs["active"].append((before, gold))
        reviewed_pairs["candidate"].append((after, gold))
        counts["fixed"].update(label for label in before ^ after if (label in after) == (label in gold))
        counts["broken"].update(label for label in before ^ after if (label in before) == (label in gold))
        if after == gold != before:
            now_right.append(entry | {"gold": item.gold})
        elif before == gold != after:
            now_wrong.append(entry | {"gold": item.gold})
    labels = set().union(*counts.values())
    per_label = [{"label": label} | {key: counts[key][label] for key in counts} for label in labels]
    per_label.sort(key=lambda row: (-(row["gained"] + row["lost"]), -row["candidate"], row["label"]))
    reviewed = len(reviewed_pairs["active"])
    return {
        "sample": {"size": len(sampled), "reviewed": reviewed},
        "changed": len(changes),
        "gained": sum(counts["gained"].values()),
        "lost": sum(counts["lost"].values()),
        "per_label": per_label,
        "changes": changes[:LISTED],
        "reviewed": {
            "count": reviewed,
            "active_micro_f1": micro_f1(reviewed_pairs["active"]),
            "candidate_micro_f1": micro_f1(reviewed_pairs["candidate"]),
            "active_exact": sum(p == g for p, g in reviewed_pairs["active"]),
            "candidate_exact": sum(p == g for p, g in reviewed_pairs["candidate"]),
            "labels_fixed": sum(counts["fixed"].values()),
            "labels_broken": sum(counts["broken"].values()),
            "now_right_count": len(now_right),
            "now_wrong_count": len(now_wrong),
            "now_right": now_right[:LISTED],
            "now_wrong": now_wrong[:LISTED],
        },
    }


def _load(version_id: str) -> LoadedModel:
    """The served model object when this worker serves the version, else the version loaded like the watcher
    loads it (through the model cache)."""
    live = live_models()
    served = next((entry.model for entry in live.current().values() if entry.version_id == version_id), None)
    if served is not None:
        return served
    try:
        return load_version(version_id, live.cache_root, threads=live.threads)
    except (BundleError, OSError) as exc:
        raise ReplayError(f"{version_id} cannot be loaded, so it cannot be replayed: {exc}") from exc


def run_replay(version_id: str, *, actor: str | None) -> ReplayReport:
    """Replay a candidate against its taxonomy's active version and store the report. Raises
    :class:`~webapp.serving.registry.RegistryError` for an unknown version, :class:`ReplayError` when it cannot run."""
    candidate = get_version(version_id)
    taxonomy = candidate.taxonomy
    active_id = taxonomy.active_version_id
    if active_id is None:
        raise ReplayError(f"{taxonomy.name} has no active version to compare {version_id} with")
    if active_id == version_id:
        raise ReplayError(f"{version_id} is the active {taxonomy.name} version; replay a version that is not active")
    active_model, candidate_model = _load(active_id), _load(version_id)
    sampled = sample(taxonomy, int(current_app.config["REPLAY_SAMPLE_SIZE"]))
    texts = [compose_text(item.prediction.title, item.prediction.abstract) for item in sampled]
    labels_map = label_map(taxonomy.id)
    figures = compare(
        sampled, predicted_sets(active_model, texts, labels_map), predicted_sets(candidate_model, texts, labels_map)
    )
    report = ReplayReport(
        taxonomy_id=taxonomy.id,
        candidate_version_id=version_id,
        active_version_id=active_id,
        sample_size=len(sampled),
        created_by=actor,
        report={"taxonomy": taxonomy.slug} | figures,
    )
    db.session.add(report)
    db.session.commit()
    return report


def latest_report(version_id: str) -> ReplayReport | None:
    return db.session.scalar(
        select(ReplayReport)
        .where(ReplayReport.candidate_version_id == version_id)
        .order_by(ReplayReport.id.desc())
        .limit(1)
    )


def report_json(report: ReplayReport) -> dict[str, Any]:
    return {
        "id": report.id,
        "candidate_version": report.candidate_version_id,
        "active_version": report.active_version_id,
        "sample_size": report.sample_size,
        "created_at": report.created_at.isoformat() + "Z",
        "created_by": report.created_by,
        "report": report.report,
    }


@bp.get("/models/<version_id>/replay")
@role_required("admin")
def show(version_id: str) -> str:
    version = get_version(version_id)
    active_id = version.taxonomy.active_version_id
    active = db.session.get(ModelVersion, active_id) if active_id else None
    return render_template("replay/show.html", version=version, active=active, replay=latest_report(version_id))


@bp.post("/models/<version_id>/replay")
@role_required("admin")
def replay(version_id: str) -> Response:
    try:
        report = run_replay(version_id, actor=current_user.name)
    except ReplayError as exc:
        db.session.rollback()
        flash(f"Nothing replayed: {exc.description}.", "error")
    else:
        flash(f"Replayed {report.sample_size} stored abstracts with {version_id} and {report.active_version_id}.", "ok")
    return redirect(url_for("replay.show", version_id=version_id))


@api_bp.post("/models/<version_id>/replay")
@token_user_role("admin")
def api_replay(version_id: str) -> tuple[Response, int]:
    report = run_replay(version_id, actor=f"api:{g.api_user.name}")
    return jsonify(report_json(report)), 201


@api_bp.get("/models/<version_id>/replay")
@token_user_role("curator")
def api_latest(version_id: str) -> Response:
    get_version(version_id)
    report = latest_report(version_id)
    if report is None:
        raise NotFound(f"{version_id} has not been replayed yet: POST /api/v1/models/{version_id}/replay")
    return jsonify(report_json(report))
