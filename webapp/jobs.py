"""The in-process background job runner shared by CSV batches and replays.

Each web process has one daemon thread that claims jobs of every registered kind and processes them. A job is a
row with ``status`` (queued -> running -> finished | failed), ``worker`` and ``heartbeat_at``: it is held by
claiming it with a conditional UPDATE and renewing the heartbeat while it works, so a job whose process died
(its heartbeat went stale after ``BATCH_STALE_SECONDS``) is taken over by another process, and a holder that lost
its job notices at its next heartbeat and commits nothing more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Flask, current_app
from sqlalchemy import and_, or_, select, update

from .extensions import db
from .models import utcnow

log = logging.getLogger(__name__)
EXTENSION_KEY = "papertag.batch_worker"  # the name the batch worker had before replays shared it


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its table (a model with id, status, worker, heartbeat_at, finished_at, error) and the
    function that does the work once this process holds a job of it."""

    name: str
    model: Any
    process: Callable[[int, str], None]
    # Columns set when a job is claimed, besides status, worker and heartbeat (e.g. started_at).
    on_claim: Callable[[Any], dict[str, Any]] = field(default=lambda _model: {})


def _claimable(model: Any, stale_before: Any) -> Any:
    """Queued jobs, and running ones whose holder stopped renewing its heartbeat (its process died)."""
    return or_(
        model.status == "queued",
        and_(model.status == "running", or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale_before)),
    )


def stale_before() -> Any:
    """The heartbeat time before which a running job counts as abandoned."""
    return utcnow() - timedelta(seconds=float(current_app.config["BATCH_STALE_SECONDS"]))


def is_waiting(job: Any) -> bool:
    """A running job whose holder has gone quiet: a page says it waits to be taken over."""
    return job.status == "running" and (job.heartbeat_at is None or job.heartbeat_at < stale_before())


def claim(kind: JobKind, worker: str) -> int | None:
    """Take the oldest claimable job of ``kind``; the conditional UPDATE lets exactly one worker win it."""
    model, before = kind.model, stale_before()
    candidates = db.session.scalars(select(model.id).where(_claimable(model, before)).order_by(model.id)).all()
    for job_id in candidates:
        claimed = db.session.execute(
            update(model)
            .where(model.id == job_id, _claimable(model, before))
            .values(status="running", worker=worker, heartbeat_at=utcnow(), **kind.on_claim(model))
        ).rowcount
        db.session.commit()
        if claimed:
            return job_id
    return None


def heartbeat(model: Any, job_id: int, worker: str, **values: Any) -> bool:
    """Renew the heartbeat (and set ``values``) only while ``worker`` still holds the job, without committing:
    the caller commits it with the work it belongs to, or rolls everything back when this returns False."""
    held = db.session.execute(
        update(model)
        .where(model.id == job_id, model.worker == worker, model.status == "running")
        .values(heartbeat_at=utcnow(), **values)
    ).rowcount
    return bool(held)


def finish(model: Any, job_id: int, worker: str, *, status: str, error: str | None = None, **values: Any) -> bool:
    """End a job this worker holds (finished or failed) and commit; False when another worker took it over."""
    done = db.session.execute(
        update(model)
        .where(model.id == job_id, model.worker == worker)
        .values(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow(), **values)
    ).rowcount
    db.session.commit()
    return bool(done)


class JobRunner:
    """One per process: a daemon thread that claims and processes jobs of every registered kind, woken when one
    is queued and otherwise polling now and then (``BATCH_POLL_SECONDS``) for jobs left behind by a dead process."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.kinds: list[JobKind] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def register(self, kind: JobKind) -> None:
        if all(known.name != kind.name for known in self.kinds):
            self.kinds.append(kind)

    def ensure_started(self) -> None:
        """Start the thread once per process (after gunicorn forks, not at import)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="papertag-job-runner", daemon=True)
            self._thread.start()
            self._pid = os.getpid()

    def wake(self) -> None:
        self.ensure_started()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._pid = None

    def run_pending(self) -> int:
        """Process every claimable job of every kind, oldest first within a kind; returns how many were taken."""
        taken = 0
        with self.app.app_context():
            try:
                for kind in self.kinds:
                    while not self._stop.is_set() and (job_id := claim(kind, self.name)) is not None:
                        log.info("%s job %d claimed by %s", kind.name, job_id, self.name)
                        kind.process(job_id, self.name)
                        taken += 1
            finally:
                db.session.remove()
        return taken

    def _run(self) -> None:
        interval = float(self.app.config["BATCH_POLL_SECONDS"])
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception as exc:  # the database may be away for a moment; try again on the next round
                log.warning("job runner %s could not look for jobs: %s", self.name, exc)
            self._wake.wait(interval)
            self._wake.clear()


def register(app: Flask, kind: JobKind) -> JobRunner:
    """Add ``kind`` to the app's runner (made on first use); blueprints call it when they are registered."""
    runner = app.extensions.setdefault(EXTENSION_KEY, JobRunner(app))
    runner.register(kind)
    return runner


def job_runner() -> JobRunner:
    return current_app.extensions[EXTENSION_KEY]
