"""A job worker process: ``flask --app wsgi jobs worker`` runs Huey's consumer on the app's queue
(``webapp/jobs/engine.py``), so CSV batches and replays run beside the web processes, never in them.

Besides the consumer's threads, a sweeper thread queues again, at start and every ``BATCH_POLL_SECONDS``, the jobs
no task is pending for (a killed worker's, a lost queue's). SIGTERM (Render's deploys, ``make run`` stopping) and
SIGINT stop at once and hand the jobs this process held back to the queue, so another worker resumes them without
waiting for their heartbeat to go stale; only the chunk in progress is redone.

Each consumer thread runs one job (a batch's chunk, a replay) at a time with ``ORT_THREADS`` onnxruntime intra-op
threads, 1 when unset: a batch is shared out chunk by chunk, so a machine's cores are filled by job threads or
worker processes (two processes on two cores each take one), never by threads of one run that would fight theirs.

A worker lowers its own priority by ``JOB_WORKER_NICE`` (10): where it shares a machine with gunicorn (``make run``),
the pages are served first and the batch runs on what is left, so a large batch does not slow the site down.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from huey.consumer import Consumer

from ..serving.registry import live_models
from .engine import EXTENSION_KEY, QUEUE_FILE, JobEngine, process_prefix

log = logging.getLogger(__name__)
# How long an idle consumer thread waits at most between looks at a SQLite queue (Redis blocks until a task
# comes): a queued job starts within about this long.
IDLE_POLL_SECONDS = 1.0


class _Consumer(Consumer):
    """Huey's consumer, except that SIGINT (Ctrl-C) stops at once as SIGTERM does: the jobs held are handed back
    rather than waited for (a batch may take many minutes, and only its current chunk is redone)."""

    def _set_signal_handlers(self) -> None:
        super()._set_signal_handlers()
        signal.signal(signal.SIGINT, self._handle_stop_signal)


def _sweep_every(engine: JobEngine, interval: float, stop: threading.Event) -> None:
    while True:
        try:
            queued = engine.sweep()
            if queued:
                log.info("queued %d job(s) that no task was pending for", queued)
        except Exception as exc:  # the database or the queue may be away for a moment; try again next round
            log.warning("could not sweep the job tables: %s", exc)
        if stop.wait(interval):
            return


def run_worker(app: Flask, threads: int = 1) -> None:
    """Run jobs until SIGTERM or SIGINT (blocks; installs the consumer's signal handlers, so the main thread)."""
    engine: JobEngine = app.extensions[EXTENSION_KEY]
    niceness = os.nice(int(app.config["JOB_WORKER_NICE"]))  # every thread started from here inherits it
    with app.app_context():
        live = live_models()
        live.threads = int(app.config["ORT_THREADS"]) or 1  # before the first job loads the models
    consumer = _Consumer(
        engine.huey, workers=threads, worker_type="thread", periodic=False, max_delay=IDLE_POLL_SECONDS
    )
    stop = threading.Event()
    interval = float(app.config["BATCH_POLL_SECONDS"])
    sweeper = threading.Thread(target=_sweep_every, args=(engine, interval, stop), name="job-sweeper", daemon=True)
    sweeper.start()
    log.info(
        "job worker %s: %d thread(s), %d onnxruntime thread(s) each, niceness %d, on %s",
        process_prefix().rstrip(":"),
        threads,
        live.threads,
        niceness,
        _queue_name(app),
    )
    try:
        consumer.run()
    finally:
        stop.set()
        released = engine.release(process_prefix())
        if released:
            log.info("handed %d running job(s) back to the queue", released)


def _queue_name(app: Flask) -> str:
    """Where the queue is, for the log (a Redis URL's password stays out)."""
    url = app.config["REDIS_URL"]
    return f"Redis at {url.rsplit('@', 1)[-1]}" if url else f"SQLite {app.config['DATA_DIR']}/{QUEUE_FILE}"


@click.group("jobs", help="Run the background job workers (CSV batches, replays).")
def jobs_cli() -> None:
    pass


@jobs_cli.command("worker")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True, help="Jobs run at once.")
@with_appcontext
def worker_command(threads: int) -> None:
    """Run the job queue's consumer until SIGTERM or SIGINT (held jobs are handed back to the queue)."""
    run_worker(current_app._get_current_object(), threads)  # type: ignore[attr-defined]
    # A consumer thread may still be inside onnxruntime (a chunk half tagged), whose C++ globals abort the process
    # (SIGABRT, "terminate called without an active exception") when the interpreter's exit destroys them under a
    # running session. Its job is handed back already and nothing else needs tidying: leave without running them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
