"""Training runs: queued from the site (or started by the trainer CLI), claimed by a trainer worker,
updated with progress, finished with a candidate version. The site shows them; the trainer writes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from .extensions import db
from .models import Taxonomy, TrainingRun, utcnow
from .serving.registry import RegistryError

STATUSES = ("queued", "running", "finished", "failed")
# The state machine, in one place: where a run may go from each state. A run is queued by the site (or created
# running by the trainer CLI); claim_next moves queued -> running atomically; "running" -> "running" is a progress
# update; nothing leaves finished or failed, so an ended run can never be claimed or trained again.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed"}),
    "running": frozenset({"running", "finished", "failed"}),
    "finished": frozenset(),
    "failed": frozenset(),
}
PROGRESS_KEYS = {"phase", "stage", "epoch", "step", "total_steps", "loss", "eta_seconds", "validation_micro_f1"}
# A run's phases in the order the trainer goes through them (issue 12 point 7): the page shows which are done.
# ``stage`` says in words what happens within one; ``eta_seconds`` is an estimate for the current phase only.
PHASES: dict[str, str] = {
    "prepare": "Prepare",  # read the data, pick the encoder
    "epoch": "Epochs",  # fine-tune the encoder (skipped when a fine-tuned encoder is reused)
    "export": "Export",  # the encoder to ONNX, int8
    "fit": "Head and thresholds",  # read the abstracts, fit the head, tune thresholds, measure, write the bundle
    "gate": "Gate",  # the promotion gate against the active model
    "publish": "Publish",  # register the version (and activate it when the gate passed)
}
MAX_STAGE_CHARS = 200
MAX_ERROR_CHARS = 10_000
MAX_CANDIDATE_CHARS = 80  # the candidate_version column
MAX_METRICS = 50
MAX_GATE_REASON_CHARS = 1000


class RunFieldError(ValueError):
    """A progress or completion field of the wrong type or range (a 400); the message names the field."""


class RunStateError(Exception):
    """An update the run's current state does not allow (a 409); the message names both states."""


def _text(limit: int) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise RunFieldError(f"{name} must be a string, not {_type(value)}")
        if len(value) > limit:
            raise RunFieldError(f"{name} is {len(value)} characters long; at most {limit} are allowed")
        if "\x00" in value or any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise RunFieldError(f"{name} contains a NUL character or a lone surrogate, which is not text")
        return value

    return check


def _number(*, integer: bool = False, high: float | None = None) -> Callable[[str, Any], int | float]:
    """A JSON number (never a boolean), finite and non-negative, whole when ``integer``, at most ``high``."""

    def check(name: str, value: Any) -> int | float:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise RunFieldError(f"{name} must be a {'whole ' if integer else ''}number, not {_type(value)}")
        bound = high if high is not None else 2**53  # past it a JSON number loses precision in browsers
        if not (math.isfinite(value) and 0 <= value <= bound):
            raise RunFieldError(f"{name} must be a finite number from 0 to {bound}, not {value!r}")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RunFieldError(f"{name} must be true or false, not {_type(value)}")
    return value


def _metrics(name: str, value: Any) -> dict[str, int | float]:
    """Test-split figures: an object of at most MAX_METRICS numbers."""
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise RunFieldError(f"{name} must be an object of at most {MAX_METRICS} numbers")
    figure = _number()
    return {_text(100)(f"{name} key", key): figure(f"{name}.{key}", v) for key, v in value.items()}


GATE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "passed": _flag,
    "reason": _text(MAX_GATE_REASON_CHARS),
    "candidate_micro_f1": _number(high=1),
    "active_micro_f1": lambda name, value: None if value is None else _number(high=1)(name, value),
    "drift": _number(),
}


def _gate(name: str, value: Any) -> dict[str, Any]:
    """The promotion gate's verdict as the trainer reports it (trainer.publish.GateResult)."""
    if not isinstance(value, dict) or set(value) != set(GATE_FIELDS):
        raise RunFieldError(f"{name} must be an object with exactly {', '.join(sorted(GATE_FIELDS))}")
    return {key: check(f"{name}.{key}", value[key]) for key, check in GATE_FIELDS.items()}


def _phase(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in PHASES:
        raise RunFieldError(f"{name} must be one of {', '.join(PHASES)}, not {value!r}")
    return value


def _status(name: str, value: Any) -> str:
    if value not in STATUSES:
        raise RunFieldError(f"{name} must be one of {', '.join(STATUSES)}, not {value!r}")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# Every field an update may carry and how it is checked; anything else is refused so a typo cannot vanish.
UPDATE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "status": _status,
    "error": _text(MAX_ERROR_CHARS),
    "metrics": _metrics,
    "candidate_version": _text(MAX_CANDIDATE_CHARS),
    "gate": _gate,
    "phase": _phase,
    "stage": _text(MAX_STAGE_CHARS),
    "epoch": _number(integer=True),
    "step": _number(integer=True),
    "total_steps": _number(integer=True),
    "loss": _number(),
    "eta_seconds": _number(),
    "validation_micro_f1": _number(high=1),
}


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


def check_update(changes: dict[str, Any]) -> dict[str, Any]:
    """The update with every field checked (RunFieldError names the first bad or unknown one)."""
    unknown = set(changes) - set(UPDATE_FIELDS)
    if unknown:
        raise RunFieldError(f"unknown training-run fields: {', '.join(sorted(unknown))}")
    return {key: UPDATE_FIELDS[key](key, value) for key, value in changes.items()}


def update_run(run_id: int, changes: dict[str, Any]) -> TrainingRun:
    """Apply a progress or completion update sent by the trainer, if the run's state allows it (TRANSITIONS;
    an update without ``status`` keeps the current one). The write is conditional on the state read, so two
    updates racing (finished and failed, say) cannot both apply."""
    checked = check_update(changes)
    run = get_run(run_id)
    current = run.status
    wanted = checked.get("status") or current
    if wanted not in TRANSITIONS[current]:
        allowed = sorted(TRANSITIONS[current])
        where = f"from {current} it may go to {', '.join(allowed)}" if allowed else "it has ended"
        raise RunStateError(f"training run {run.id} is {current}; it cannot be updated as {wanted} ({where})")
    now = utcnow()
    values: dict[str, Any] = {"status": wanted, "updated_at": now}
    progress = {k: v for k, v in checked.items() if k in PROGRESS_KEYS}
    ended = wanted in ("finished", "failed")
    if progress or ended:
        values["progress"] = merge_progress(run.progress or {}, progress, now=now, ended=ended)
    if ended:
        values["finished_at"] = now
    values.update({k: checked[k] for k in ("error", "metrics", "candidate_version", "gate") if k in checked})
    done = db.session.execute(
        update(TrainingRun).where(TrainingRun.id == run.id, TrainingRun.status == current).values(**values)
    ).rowcount
    db.session.commit()
    if not done:
        raise RunStateError(f"training run {run.id} changed from {current} meanwhile; read it again")
    return get_run(run_id)


def merge_progress(old: dict[str, Any], new: dict[str, Any], *, now: datetime, ended: bool) -> dict[str, Any]:
    """The run's progress after an update. An estimate of time left is kept with when it was made (so the page
    can count it down) and only while it can be true: a new phase without its own estimate, or the end of the
    run, drops the old one (no stale "Time left 27 s" after the run finished)."""
    merged = {**old, **new}
    stamp = now.isoformat() + "Z"
    if new.get("phase", old.get("phase")) != old.get("phase"):
        merged["phase_started_at"] = stamp
        merged["phases_seen"] = [*old.get("phases_seen", []), new["phase"]]
        if "eta_seconds" not in new:
            merged.pop("eta_seconds", None)
    if "eta_seconds" in new:
        merged["eta_at"] = stamp
    if ended:
        merged.pop("eta_seconds", None)
    if "eta_seconds" not in merged:
        merged.pop("eta_at", None)
    return merged


def time_left(run: TrainingRun, now: datetime | None = None) -> int | None:
    """Seconds left by the trainer's latest estimate, counted down since it was made; None when there is no
    estimate (unknown is shown as nothing, not as a guess) or the run is not running."""
    progress = run.progress or {}
    eta, at = progress.get("eta_seconds"), progress.get("eta_at")
    if run.status != "running" or eta is None or not isinstance(at, str):
        return None
    since = ((now or utcnow()) - datetime.fromisoformat(at.removesuffix("Z"))).total_seconds()
    return max(0, round(eta - max(0.0, since)))


def claim_next(worker: str) -> TrainingRun | None:
    """Atomically take the oldest queued run (queued -> running in TRANSITIONS): the conditional UPDATE lets only
    one worker win it."""
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
        "time_left_seconds": time_left(run),
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
