"""Replay before promotion: re-score a sample of stored abstracts with a candidate version and with the active
version of its taxonomy, and report what activating the candidate would change (labels gained and lost, per-label
counts, and the reviewed predictions it would now get right or wrong).

Both sides are scored fresh, by the same inference code, on the same texts. Stored results may come from older
versions or thresholds, so comparing the candidate with them would blame it for what earlier models did.

A replay is a background job (``webapp/jobs/engine.py``, the engine CSV batches use): the request queues it, a worker
process claims it, re-scores up to ``REPLAY_SAMPLE_SIZE`` abstracts chunk by chunk with a heartbeat and a progress
count that its page polls, and stores the report, so the page shows it without recomputing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, flash, g, jsonify, redirect, render_template, url_for
from flask_login import current_user
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import Conflict, NotFound

from ..access.auth import role_required, token_user_role
from ..admin import gate_failed
from ..curation.annotations import current_labels, has_active_event, label_map
from ..extensions import db
from ..models import DATASET_SOURCE, AnnotationEvent, ModelVersion, Prediction, PredictionResult, ReplayReport, Taxonomy
from ..serving.bundle import BundleError, compose_text
from ..serving.inference import LoadedModel
from ..serving.registry import RegistryError, get_version, live_models, load_version
from ..surgery import LabelMap
from . import engine

log = logging.getLogger(__name__)
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
    """Up to ``size`` stored predictions of the taxonomy: the reviewed ones first (latest reviewed first), then the
    newest others; never base-data papers (the label-error queue's), which trained the models compared."""
    latest_event = (
        select(func.max(AnnotationEvent.id))
        .where(AnnotationEvent.prediction_id == PredictionResult.prediction_id)
        .where(AnnotationEvent.taxonomy_id == taxonomy.id)
        .scalar_subquery()
    )
    # Reviewed: an accept, correction or adjudication still in force (a skip or an undone review is no gold).
    reviewed_ids = list(
        db.session.scalars(
            select(PredictionResult.prediction_id)
            .join(Prediction, Prediction.id == PredictionResult.prediction_id)
            .where(PredictionResult.taxonomy_id == taxonomy.id)
            .where(has_active_event(PredictionResult.prediction_id, taxonomy.id))
            .where(Prediction.source != DATASET_SOURCE)  # base-data papers trained the models compared
            .group_by(PredictionResult.prediction_id)
            .order_by(func.max(latest_event).desc())
            .limit(size)
        )
    )
    other_ids = list(
        db.session.scalars(
            select(PredictionResult.prediction_id)
            .join(Prediction, Prediction.id == PredictionResult.prediction_id)
            .where(PredictionResult.taxonomy_id == taxonomy.id, PredictionResult.prediction_id.not_in(reviewed_ids))
            .where(Prediction.source != DATASET_SOURCE)
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
    return [
        set(labels_map.map_labels(model.predicted(scored), text))
        for scored, text in zip(model.score(texts), texts, strict=True)
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


def queue_replay(version_id: str, *, actor: str | None) -> ReplayReport:
    """Queue a replay of a candidate against its taxonomy's active version, or return the one already queued or
    running for it. Raises :class:`~webapp.serving.registry.RegistryError` for an unknown version and
    :class:`ReplayError` when there is nothing to compare it with (checked again when the job runs). The caller
    enqueues it (:func:`webapp.jobs.engine.enqueue`) once it has read what it answers (the job may start at once)."""
    candidate = get_version(version_id)
    active_id = _comparable(candidate)
    pending = db.session.scalar(
        select(ReplayReport)
        .where(ReplayReport.candidate_version_id == version_id, ReplayReport.status.in_(("queued", "running")))
        .order_by(ReplayReport.id.desc())
        .limit(1)
    )
    if pending is not None:
        return pending
    report = ReplayReport(
        taxonomy_id=candidate.taxonomy_id,
        candidate_version_id=version_id,
        active_version_id=active_id,
        sample_size=0,
        created_by=actor,
        report={},
        status="queued",
    )
    db.session.add(report)
    db.session.commit()
    return report


def _comparable(candidate: ModelVersion) -> str:
    """The active version ``candidate`` is compared with; a :class:`ReplayError` when there is none to compare."""
    taxonomy = candidate.taxonomy
    active_id = taxonomy.active_version_id
    if active_id is None:
        raise ReplayError(f"{taxonomy.name} has no active version to compare {candidate.id} with")
    if active_id == candidate.id:
        raise ReplayError(f"{candidate.id} is the active {taxonomy.name} version; replay a version that is not active")
    return active_id


def process_replay(report_id: int, worker: str) -> None:
    """Run a claimed replay: load both models, sample, score chunk by chunk (``BATCH_CHUNK_SIZE`` abstracts,
    committing the progress and the heartbeat after each), then store the report. A replay taken over from a
    dead process starts again from its first abstract: the scores are recomputed, not stored half-way."""
    job = db.session.get(ReplayReport, report_id)
    assert job is not None
    try:
        candidate = get_version(job.candidate_version_id)
        taxonomy = candidate.taxonomy
        active_id = _comparable(candidate)  # the active version now, which may differ from when it was queued
        active_model, candidate_model = _load(active_id), _load(candidate.id)
        sampled = sample(taxonomy, int(current_app.config["REPLAY_SAMPLE_SIZE"]))
        if not _progress(report_id, worker, sample_size=len(sampled), processed=0, active_version_id=active_id):
            return
        texts = [compose_text(item.prediction.title, item.prediction.abstract) for item in sampled]
        labels_map = label_map(taxonomy.id)
        chunk = int(current_app.config["BATCH_CHUNK_SIZE"])
        active: list[set[str]] = []
        candidates: list[set[str]] = []
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            active += predicted_sets(active_model, part, labels_map)
            candidates += predicted_sets(candidate_model, part, labels_map)
            if not _progress(report_id, worker, processed=len(active)):
                return
        figures = compare(sampled, active, candidates)
        engine.finish(ReplayReport, report_id, worker, status="finished", report={"taxonomy": taxonomy.slug} | figures)
    except (ReplayError, RegistryError) as exc:
        db.session.rollback()
        message = exc.description if isinstance(exc, ReplayError) else str(exc)
        engine.finish(ReplayReport, report_id, worker, status="failed", error=message)
    except Exception as exc:
        db.session.rollback()
        log.exception("replay %d failed", report_id)
        engine.finish(ReplayReport, report_id, worker, status="failed", error=f"{exc.__class__.__name__}: {exc}")


def _progress(report_id: int, worker: str, **values: Any) -> bool:
    """Commit progress while this worker holds the replay; False (and nothing written) once another took it."""
    if not engine.heartbeat(ReplayReport, report_id, worker, **values):
        db.session.rollback()
        log.warning("replay %d was taken over by another worker; %s stops", report_id, worker)
        return False
    db.session.commit()
    return True


REPLAY_JOBS = engine.JobKind("replay", ReplayReport, process_replay)


@bp.record_once
def _attach_runner(state: Any) -> None:
    engine.register(state.app, REPLAY_JOBS)


def latest_report(version_id: str, *, finished: bool = False) -> ReplayReport | None:
    """The version's newest replay (with ``finished``, its newest finished one: the report to show)."""
    query = select(ReplayReport).where(ReplayReport.candidate_version_id == version_id)
    if finished:
        query = query.where(ReplayReport.status == "finished")
    return db.session.scalar(query.order_by(ReplayReport.id.desc()).limit(1))


def job_json(job: ReplayReport) -> dict[str, Any]:
    """A replay job's state, what its page polls and the API's status URL answers."""
    return {
        "id": job.id,
        "candidate_version": job.candidate_version_id,
        "active_version": job.active_version_id,
        "status": job.status,
        "processed": job.processed,
        "sample_size": job.sample_size,
        "percent": round(100 * job.processed / job.sample_size) if job.sample_size else 0,
        "error": job.error,
        "created_at": job.created_at.isoformat() + "Z",
        "created_by": job.created_by,
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
        "status_url": url_for("replay_api.api_job", report_id=job.id),
    }


def report_json(report: ReplayReport) -> dict[str, Any]:
    """A finished replay: its job state and the report."""
    return job_json(report) | {"report": report.report}


def _get_job(version_id: str, report_id: int) -> ReplayReport:
    job = db.session.get(ReplayReport, report_id)
    if job is None or job.candidate_version_id != version_id:
        raise NotFound(f"{version_id} has no replay {report_id}")
    return job


@bp.get("/models/<version_id>/replay")
@role_required("admin")
def show(version_id: str) -> str:
    version = get_version(version_id)
    active_id = version.taxonomy.active_version_id
    active = db.session.get(ModelVersion, active_id) if active_id else None
    latest = latest_report(version_id)
    report = latest if latest is not None and latest.status == "finished" else latest_report(version_id, finished=True)
    job = latest if latest is not None and latest.status != "finished" else None
    return render_template(
        "replay/show.html",
        version=version,
        active=active,
        replay=report,
        job=job,
        job_status=job_json(job) if job else None,
        waiting=job is not None and engine.is_waiting(job),
        gate_failed=gate_failed(version.id),
    )


@bp.get("/models/<version_id>/replay/<int:report_id>/status")
@role_required("admin")
def status(version_id: str, report_id: int) -> Response:
    """What the replay page polls to move its progress bar."""
    return jsonify(job_json(_get_job(version_id, report_id)))


@bp.post("/models/<version_id>/replay")
@role_required("admin")
def replay(version_id: str) -> Response:
    try:
        job = queue_replay(version_id, actor=current_user.name)
    except ReplayError as exc:
        db.session.rollback()
        flash(f"Nothing replayed: {exc.description}.", "error")
    else:
        flash(f"Replay #{job.id} of {version_id} against {job.active_version_id} is {job.status}.", "ok")
        engine.enqueue(REPLAY_JOBS, job.id)
    return redirect(url_for("replay.show", version_id=version_id))


@api_bp.post("/models/<version_id>/replay")
@token_user_role("admin")
def api_replay(version_id: str) -> tuple[Response, int]:
    """Queue a replay (or find the one queued or running): 202 with the job and its ``status_url``."""
    body = job_json(queue_replay(version_id, actor=f"api:{g.api_user.name}"))
    engine.enqueue(REPLAY_JOBS, body["id"])
    response = jsonify(body)
    response.headers["Location"] = body["status_url"]
    return response, 202


@api_bp.get("/replays/<int:report_id>")
@token_user_role("curator")
def api_job(report_id: int) -> Response:
    """A replay job's state, with its report once it finished."""
    job = db.session.get(ReplayReport, report_id)
    if job is None:
        raise NotFound(f"there is no replay {report_id}")
    return jsonify(report_json(job) if job.status == "finished" else job_json(job))


@api_bp.get("/models/<version_id>/replay")
@token_user_role("curator")
def api_latest(version_id: str) -> Response:
    """The version's newest finished replay report."""
    get_version(version_id)
    report = latest_report(version_id, finished=True)
    if report is None:
        raise NotFound(f"{version_id} has not been replayed yet: POST /api/v1/models/{version_id}/replay")
    return jsonify(report_json(report))
