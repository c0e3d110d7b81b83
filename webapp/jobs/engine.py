"""The job engine shared by CSV batches and replays: Huey queues the work, dedicated worker processes do it.

A web process only writes a job row and enqueues a Huey task carrying the job's id (``JobEngine.enqueue``); a
worker process (``flask --app wsgi jobs worker``, ``webapp/jobs/worker.py``) runs Huey's consumer, whose task claims the
row and processes it. Huey's queue lives in a SQLite file in ``DATA_DIR`` (one machine, nothing to install) or in
Redis (``REDIS_URL``: workers on any machine).

The job tables stay the record of progress: a job is a row with ``status`` (queued -> running -> finished |
failed), ``worker`` and ``heartbeat_at``. It is held by claiming it with a conditional UPDATE and renewing the
heartbeat while it works, so a task delivered twice finds the job held and does nothing, and a holder that lost
its job (taken over after its heartbeat went stale) notices at its next heartbeat and commits nothing more.
Huey drops a task once a worker takes it, so a worker killed mid-job takes its task with it: every worker process
sweeps the tables now and then (``JobEngine.sweep``) and enqueues again the running jobs whose heartbeat went stale
(after ``BATCH_STALE_SECONDS``) and, when the queue is empty, the queued jobs no task is pending for (lost with a
queue, or made before the engine existed).

A "job" here is whatever a kind claims: a replay is one, a CSV batch is many, one per chunk of its rows
(``webapp/jobs/batch.py``), so several workers tag one batch together.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from huey import Huey, RedisHuey, SqliteHuey
from huey.storage import RedisStorage
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import and_, or_, select, update

from ..extensions import db
from ..models import utcnow

log = logging.getLogger(__name__)
EXTENSION_KEY = "papertag.batch_worker"  # the name the batch worker had before replays shared it
QUEUE_NAME = "papertag"
QUEUE_FILE = "job-queue.db"  # Huey's SQLite storage, in DATA_DIR


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its table (a model with id, status, worker, heartbeat_at, finished_at, error) and the
    function that does the work once this worker holds a job of it."""

    name: str
    model: Any
    process: Callable[[int, str], None]
    # Columns set when a job is claimed, besides status, worker and heartbeat (e.g. started_at).
    on_claim: Callable[[Any], dict[str, Any]] = field(default=lambda _model: {})
    # Run by every sweep before it queues anything: ends what its own jobs' ends left open when a worker died in
    # between (a batch whose last chunk was committed but not the batch's end); returns how many it ended.
    settle: Callable[[], int] | None = None


def _abandoned(model: Any, stale_before: Any) -> Any:
    """Running jobs whose holder stopped renewing its heartbeat (its process died)."""
    return and_(model.status == "running", or_(model.heartbeat_at.is_(None), model.heartbeat_at < stale_before))


def _claimable(model: Any, stale_before: Any) -> Any:
    """Queued jobs, and abandoned ones."""
    return or_(model.status == "queued", _abandoned(model, stale_before))


def stale_before() -> Any:
    """The heartbeat time before which a running job counts as abandoned."""
    return utcnow() - timedelta(seconds=float(current_app.config["BATCH_STALE_SECONDS"]))


def is_waiting(job: Any) -> bool:
    """A running job whose holder has gone quiet: a page says it waits to be taken over."""
    return job.status == "running" and (job.heartbeat_at is None or job.heartbeat_at < stale_before())


def claim(kind: JobKind, worker: str, job_id: int | None = None) -> int | None:
    """Take job ``job_id`` of ``kind`` (by default the oldest claimable one) if it is claimable; the conditional
    UPDATE lets exactly one worker win it."""
    model, before = kind.model, stale_before()
    query = select(model.id).where(_claimable(model, before)).order_by(model.id)
    if job_id is not None:
        query = query.where(model.id == job_id)
    for candidate in db.session.scalars(query).all():
        claimed = db.session.execute(
            update(model)
            .where(model.id == candidate, _claimable(model, before))
            .values(status="running", worker=worker, heartbeat_at=utcnow(), **kind.on_claim(model))
        ).rowcount
        db.session.commit()
        if claimed:
            return candidate
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


def finish(
    model: Any, job_id: int, worker: str, *, status: str, error: str | None = None, commit: bool = True, **values: Any
) -> bool:
    """End a job this worker holds (finished or failed) and commit; False when another worker took it over.
    ``commit=False`` leaves the commit (or the rollback, on False) to a caller that ends the job with its work."""
    done = db.session.execute(
        update(model)
        .where(model.id == job_id, model.worker == worker)
        .values(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow(), **values)
    ).rowcount
    if commit:
        db.session.commit()
    return bool(done)


def process_prefix() -> str:
    """What the names of every worker thread of this process start with."""
    return f"{socket.gethostname()}:{os.getpid()}:"


def worker_name() -> str:
    """Who holds a job: host, process and thread, so two worker threads of one process never share a job."""
    return f"{process_prefix()}{threading.get_native_id()}"


# How long a worker thread waits before it asks an unreachable Redis again.
REDIS_RETRY_SECONDS = 1.0


class _RedisStorage(RedisStorage):
    """Huey's Redis storage, except that a dequeue that cannot reach Redis waits a moment: Huey's takes the error
    for a blocking read's timeout and its worker thread asks again at once, a core spent for as long as Redis is away.
    """

    def dequeue(self) -> bytes | None:
        try:
            found = self.conn.brpop(self.queue_key, timeout=self.read_timeout)
        except RedisTimeoutError:  # the socket's own timeout: nothing came, as when the read times out
            return None
        except RedisConnectionError:
            time.sleep(REDIS_RETRY_SECONDS)
            return None
        return found[1] if found else None


def make_queue(config: dict[str, Any]) -> Huey:
    """Huey on Redis when ``REDIS_URL`` is set, else on its SQLite storage in ``DATA_DIR``. No result store: a
    job's outcome is its row."""
    if config["REDIS_URL"]:
        return RedisHuey(QUEUE_NAME, url=config["REDIS_URL"], results=False, storage_class=_RedisStorage)
    path = Path(config["DATA_DIR"]) / QUEUE_FILE
    return SqliteHuey(QUEUE_NAME, filename=str(path), results=False, timeout=float(config["SQLITE_BUSY_TIMEOUT"]))


class JobEngine:
    """One per app: the Huey queue, the job kinds, and the one task that runs a job of any kind by its id."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.kinds: dict[str, JobKind] = {}
        self.huey = make_queue(app.config)
        # Huey's task: calling it queues a run of a job (kind name, id), past the pending mark enqueue() keeps.
        self.run_job = self.huey.task(name="run_job")(self._run)
        # Set by release(): this process claims nothing more. Its consumer threads outlive the consumer for a moment
        # and take their next task; the lock keeps a claim from slipping in between the flag and the hand-back.
        self._released = threading.Event()
        self._claiming = threading.Lock()

    def register(self, kind: JobKind) -> None:
        self.kinds.setdefault(kind.name, kind)

    @staticmethod
    def _pending_key(kind_name: str, job_id: int) -> str:
        return f"pending:{kind_name}:{job_id}"

    def enqueue(self, kind: JobKind, *job_ids: int) -> int:
        """Queue a task for each job unless one is already pending for it (its mark is younger than
        ``BATCH_STALE_SECONDS``); returns how many were queued. A mark left by a process that died between marking
        and queueing expires, so the job is queued again; two sweeps at once may both queue it, and the claim
        makes the second task a no-op."""
        queued = 0
        for job_id in job_ids:
            key = self._pending_key(kind.name, job_id)
            marked = self.huey.get(key, peek=True)
            if marked is not None and time.time() - marked < float(self.app.config["BATCH_STALE_SECONDS"]):
                continue
            self.huey.put(key, time.time())
            self.run_job(kind.name, job_id)
            queued += 1
        return queued

    def sweep(self) -> int:
        """Settle what each kind left open, then enqueue every claimable job no task is pending for: running ones
        whose holder went quiet (killed) and, when the queue is empty, queued ones (whose task was lost, or made
        before the upgrade to this engine). While the queue holds tasks a queued job's task is presumed among them:
        a big batch's chunks wait longer than a pending mark lives, and queueing them again would only add tasks
        that find them taken. Returns how many were queued."""
        queued = 0
        with self.app.app_context():
            try:
                before = stale_before()
                idle = self.huey.pending_count() == 0
                for kind in self.kinds.values():
                    if kind.settle is not None:
                        kind.settle()
                    lost = (_claimable if idle else _abandoned)(kind.model, before)
                    ids = db.session.scalars(select(kind.model.id).where(lost).order_by(kind.model.id)).all()
                    queued += self.enqueue(kind, *ids)
            finally:
                db.session.remove()
        return queued

    def release(self, prefix: str) -> int:
        """Hand back the jobs held by worker threads named ``prefix``... (a worker process stopping): queued again
        at once rather than when their heartbeat goes stale. A thread still working on one loses it at its next
        heartbeat and commits nothing more, and from now on this engine claims nothing (a task its threads still
        take goes back to the queue). Returns how many."""
        released = 0
        with self._claiming:
            self._released.set()
        with self.app.app_context():
            try:
                for kind in self.kinds.values():
                    model = kind.model
                    released += db.session.execute(
                        update(model)
                        .where(model.status == "running", model.worker.startswith(prefix, autoescape=True))
                        .values(status="queued", worker=None, heartbeat_at=None)
                    ).rowcount
                db.session.commit()
            finally:
                db.session.remove()
        return released

    def run_pending(self) -> int:
        """Run the queued tasks in this thread until none is left, as a consumer's worker thread runs them (for
        tests that play the worker); returns how many ran."""
        ran = 0
        while (task := self.huey.dequeue()) is not None:
            self.huey.execute(task)
            ran += 1
        return ran

    def stop(self) -> None:
        """Close this thread's connection to the queue (an app being torn down)."""
        self.huey.storage.close()

    def _run(self, kind_name: str, job_id: int) -> None:
        """The task: claim the job (nothing to do when another worker holds it or it ended) and process it."""
        kind = self.kinds.get(kind_name)
        if kind is None:
            # e.g. a "batch" task queued by the release before batches were chunked: the sweep queues its chunks
            log.warning("no job kind %r: its task for job %d is dropped", kind_name, job_id)
            return
        self.huey.delete(self._pending_key(kind_name, job_id))
        worker = worker_name()
        with self.app.app_context():
            try:
                with self._claiming:
                    if self._released.is_set():
                        self.enqueue(kind, job_id)  # for another worker: this process is stopping
                        return
                    claimed = claim(kind, worker, job_id)
                if claimed is None:
                    log.info("%s job %d is held by another worker or has ended", kind_name, job_id)
                    return
                log.info("%s job %d claimed by %s", kind_name, job_id, worker)
                kind.process(job_id, worker)
            finally:
                db.session.remove()


def register(app: Flask, kind: JobKind) -> JobEngine:
    """Add ``kind`` to the app's engine (made on first use); blueprints call it when they are registered."""
    engine = app.extensions.get(EXTENSION_KEY)
    if engine is None:
        engine = app.extensions[EXTENSION_KEY] = JobEngine(app)
    engine.register(kind)
    return engine


def job_engine() -> JobEngine:
    return current_app.extensions[EXTENSION_KEY]


def enqueue(kind: JobKind, *job_ids: int) -> int:
    """Queue jobs ``job_ids`` of ``kind`` on the current app's engine (what a request does after creating them);
    how many were queued. When the queue cannot be reached (Redis down) the request still succeeds: the jobs' rows
    are stored, and the workers' sweep queues them once the queue is back."""
    try:
        return job_engine().enqueue(kind, *job_ids)
    except Exception as exc:
        log.warning(
            "%s job(s) %s stored but could not be queued now (the workers' sweep will): %s",
            kind.name,
            ", ".join(map(str, job_ids[:3])) + (", ..." if len(job_ids) > 3 else ""),
            exc,
        )
        return 0
