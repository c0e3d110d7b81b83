"""Training runs: queued from the site (or started by the trainer CLI), claimed by a trainer worker,
updated with progress, finished with a candidate version. The site shows them; the trainer writes them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from .extensions import db
from .models import Taxonomy, TrainingRun, utcnow
from .serving.registry import RegistryError

STATUSES = ("queued", "running", "finished", "failed")
# Keys a progress update may set; anything else is refused so a typo cannot silently vanish.
PROGRESS_KEYS = {"stage", "epoch", "step", "total_steps", "loss", "eta_seconds", "validation_micro_f1"}
UPDATE_KEYS = {"status", "error", "metrics", "candidate_version", "activated", "gate"} | PROGRESS_KEYS


def create_run(taxonomy_slug: str, config: dict[str, Any], *, requested_by: str, queued: bool = False) -> TrainingRun:
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == taxonomy_slug))
    if taxonomy is None:
        raise RegistryError(f"no taxonomy {taxonomy_slug!r}")
    run = TrainingRun(
        taxonomy=taxonomy,
        config=config,
        requested_by=requested_by,
        status="queued" if queued else "running",
        started_at=None if queued else utcnow(),
    )
    db.session.add(run)
    db.session.commit()
    return run


def get_run(run_id: int) -> TrainingRun:
    run = db.session.get(TrainingRun, run_id)
    if run is None:
        raise RegistryError(f"no training run {run_id}")
    return run


def update_run(run_id: int, changes: dict[str, Any]) -> TrainingRun:
    """Apply a progress or completion update sent by the trainer."""
    unknown = set(changes) - UPDATE_KEYS
    if unknown:
        raise ValueError(f"unknown training-run fields: {', '.join(sorted(unknown))}")
    status = changes.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    run = get_run(run_id)
    progress = dict(run.progress or {})
    progress.update({k: v for k, v in changes.items() if k in PROGRESS_KEYS})
    run.progress = progress
    if status:
        run.status = status
        if status in ("finished", "failed"):
            run.finished_at = utcnow()
    for key in ("error", "metrics", "candidate_version", "gate"):
        if key in changes:
            setattr(run, key, changes[key])
    run.updated_at = utcnow()
    db.session.commit()
    return run


def claim_next(worker: str) -> TrainingRun | None:
    """Atomically take the oldest queued run: the conditional UPDATE lets only one worker win it."""
    while True:
        run_id = db.session.scalar(
            select(TrainingRun.id).where(TrainingRun.status == "queued").order_by(TrainingRun.id).limit(1)
        )
        if run_id is None:
            return None
        claimed = db.session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == "queued")
            .values(status="running", worker=worker, started_at=utcnow(), updated_at=utcnow())
        ).rowcount
        db.session.commit()
        if claimed:
            return get_run(run_id)


def run_json(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "taxonomy": run.taxonomy.slug,
        "status": run.status,
        "config": run.config,
        "progress": run.progress or {},
        "metrics": run.metrics,
        "candidate_version": run.candidate_version,
        "gate": run.gate,
        "error": run.error,
        "requested_by": run.requested_by,
        "worker": run.worker,
        "created_at": run.created_at.isoformat() + "Z",
        "started_at": run.started_at.isoformat() + "Z" if run.started_at else None,
        "finished_at": run.finished_at.isoformat() + "Z" if run.finished_at else None,
    }
