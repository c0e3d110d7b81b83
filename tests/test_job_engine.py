"""The job engine for real (issue 13 point 2): CSV batches uploaded through the site are queued on Huey's SQLite
storage or on Redis, chunk by chunk, and run by `flask jobs worker` processes, never by the web process. Two workers
tag one batch together, and when one is killed with SIGKILL mid-batch the other redoes its chunk once its heartbeat
is stale and finishes the batch, every CSV row stored exactly once and the counters exact; a worker stopped with
SIGTERM or SIGINT hands its chunk back at once; a chunk delivered twice runs once; a batch queued without tasks
(before the engine existed, or with a lost queue) is found by the workers' sweep.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import BundleFactory, database_url_for, job_engine_of, live_models_of, make_app, signed_in
from tests.gunicorn_harness import BIN, REPO, app_env, database, flask_cli, gunicorn, request, worker_pids
from tests.test_batch import make_csv
from tests.tiny_bundle import fixture_abstracts
from webapp.extensions import db
from webapp.jobs import engine as jobs
from webapp.jobs.batch import BATCH_CHUNKS, create_job, parse_csv
from webapp.models import BatchChunk, BatchJob, BatchRow, Prediction, ReplayReport
from webapp.serving.registry import import_bundle

# Rows per batch, tagged two per chunk: hundreds of chunks, so a worker is killed well before the end.
ROWS = 600
# Seconds: a killed worker's job is taken over this long after its last heartbeat; workers sweep this often.
SETTINGS = {"BATCH_CHUNK_SIZE": 2, "BATCH_STALE_SECONDS": 3.0, "BATCH_POLL_SECONDS": 0.5}


@dataclass
class Site:
    app: Flask
    env: dict[str, str]
    curator: FlaskClient
    logs: Path


@pytest.fixture(params=["sqlite", "redis"])
def site(request: pytest.FixtureRequest, tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Site]:
    """An app with a model whose workers are separate processes, its queue on Huey's SQLite storage in the data
    directory or on the test Redis server (flushed first)."""
    redis_url = ""
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(redis_url).flushdb()
    data = tmp_path / "data"
    data.mkdir()
    # The settings reach the worker processes as they reach an operator's: DATA_DIR/config.py.
    (data / "config.py").write_text("".join(f"{key} = {value!r}\n" for key, value in SETTINGS.items()))
    app = make_app(data, REDIS_URL=redis_url)
    with app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    # No ORT_THREADS gives a web worker every core: a job worker takes one.
    env = app_env(data, database_url_for(data), REDIS_URL=redis_url, WEB_CONCURRENCY="1", ORT_THREADS="")
    try:
        yield Site(app, env, signed_in(app, "cora", "curator"), tmp_path)
    finally:
        live_models_of(app).stop()
        job_engine_of(app).stop()
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def workers(site: Site) -> Iterator[list[subprocess.Popen]]:
    """Start worker processes with ``workers.append(start_worker(site, n))``; every one left is killed after."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def start_worker(site: Site, n: int) -> subprocess.Popen:
    """``flask --app wsgi jobs worker`` on the site's data directory, database and queue, as an operator runs it."""
    return worker_process(site.env, site.logs / f"worker-{n}.log")


def worker_process(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``flask --app wsgi jobs worker`` with ``env``, its output in ``log``."""
    with open(log, "wb") as out:  # the process keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "flask"), "--app", "wsgi", "jobs", "worker"], cwd=REPO, env=env, stdout=out, stderr=out
        )


def logs_in(folder: Path) -> str:
    """The end of every log in ``folder`` (the workers'), for a failure's message."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.log")))


def batch_csv() -> bytes:
    """ROWS rows of the fixture abstracts, each title numbered so every row is told apart in what was stored."""
    abstracts = fixture_abstracts()
    papers = [abstracts[i % len(abstracts)] for i in range(ROWS)]
    return make_csv([["title", "abstract"]] + [[f"{p['title']} ({i})", p["abstract"]] for i, p in enumerate(papers)])


def upload(site: Site) -> int:
    """The batch uploaded through the site, as a curator does; its job id."""
    response = site.curator.post(
        "/batches", data={"file": (io.BytesIO(batch_csv()), "big.csv")}, content_type="multipart/form-data"
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return int(response.headers["Location"].rsplit("/", 1)[1])


def stored_without_task(site: Site, filename: str) -> int:
    """The batch stored as the upload stores it, with no task queued for it (as before the engine existed)."""
    with site.app.app_context():
        return create_job(filename, parse_csv(batch_csv().decode(), ROWS), created_by="tests").id


def state(site: Site, job_id: int) -> BatchJob:
    with site.app.app_context():
        job = db.session.get(BatchJob, job_id)
        db.session.expunge(job)
        return job


def wait_until(
    site: Site, job_id: int, done: Callable[[BatchJob], bool], what: str, seen: list[str] | None = None
) -> BatchJob:
    """Poll the job until ``done``; the statuses it showed are added to ``seen``, each time it changed."""
    while True:
        job = state(site, job_id)
        if seen is not None and seen[-1:] != [job.status]:
            seen.append(job.status)
        if done(job):
            return job
        assert job.status != "failed", f"job {job_id} failed: {job.error}\n{logs_in(site.logs)}"
        time.sleep(0.02)


def prefix(proc: subprocess.Popen) -> str:
    """The start of every job holder's name in a worker process (host:pid:thread)."""
    return f"{os.uname().nodename}:{proc.pid}:"


def chunks(site: Site, job_id: int) -> list[tuple[int, str, str | None]]:
    """(id, status, worker) of the batch's chunks."""
    with site.app.app_context():
        query = select(BatchChunk.id, BatchChunk.status, BatchChunk.worker).where(BatchChunk.job_id == job_id)
        return [tuple(row) for row in db.session.execute(query.order_by(BatchChunk.id))]


def chunks_of(site: Site, job_id: int, proc: subprocess.Popen, status: str) -> set[int]:
    """The batch's chunks in ``status`` whose worker is (or was) in ``proc``."""
    return {
        id_ for id_, now, worker in chunks(site, job_id) if now == status and (worker or "").startswith(prefix(proc))
    }


def started_workers(site: Site, count: int) -> list[subprocess.Popen]:
    """``count`` worker processes, once each has logged that its consumer runs (an upload finds them all waiting)."""
    procs = [start_worker(site, n) for n in range(1, count + 1)]
    for n, proc in enumerate(procs, start=1):
        while "job worker" not in (site.logs / f"worker-{n}.log").read_text():
            assert proc.poll() is None, logs_in(site.logs)
            time.sleep(0.05)
    return procs


def assert_every_row_stored_once(site: Site, job_id: int) -> None:
    with site.app.app_context():
        rows = db.session.execute(select(BatchRow.row_number, BatchRow.prediction_id).where(BatchRow.job_id == job_id))
        linked = {number: prediction for number, prediction in rows}
        stored = db.session.scalars(select(Prediction.id).where(Prediction.batch_id == job_id)).all()
        titles = db.session.scalars(select(Prediction.title).where(Prediction.batch_id == job_id)).all()
    assert len(linked) == ROWS and None not in linked.values(), "every row is linked to its prediction"
    assert sorted(stored) == sorted(linked.values()), "no prediction of the batch outside its rows (none twice)"
    assert len(set(titles)) == ROWS, "each row's title (numbered) was stored once"


def test_two_workers_share_a_batch_and_one_killed_mid_batch_loses_nothing(
    site: Site, workers: list[subprocess.Popen]
) -> None:
    workers.extend(started_workers(site, 2))
    first, second = workers
    assert "1 onnxruntime thread(s) each" in logs_in(site.logs), "two processes on the machine's cores: one each"
    job_id = upload(site)
    seen: list[str] = []
    wait_until(
        site,
        job_id,
        lambda _: chunks_of(site, job_id, first, "finished") and chunks_of(site, job_id, second, "finished"),
        "tagged by both workers",
        seen,
    )
    wait_until(site, job_id, lambda _: chunks_of(site, job_id, first, "running"), "held by the first worker")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed = state(site, job_id)
    assert killed.status == "running" and 0 < killed.processed < ROWS, "the worker was killed mid-batch"
    held = chunks_of(site, job_id, first, "running")  # still running (unless its commit landed as it was killed)

    done = wait_until(site, job_id, lambda j: j.status == "finished", "finished", seen)
    assert seen == sorted(set(seen), key=["queued", "running", "finished"].index), f"the status went back: {seen}"
    assert done.started_at <= done.finished_at and done.worker.startswith(prefix(second))
    assert (done.processed, done.skipped, done.error) == (ROWS, 0, None)
    assert held <= chunks_of(site, job_id, second, "finished"), "the second worker redid the killed one's chunk"
    assert all(status == "finished" for _, status, _ in chunks(site, job_id))
    assert_every_row_stored_once(site, job_id)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, logs_in(site.logs)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_worker_hands_its_chunk_back_at_once(
    site: Site, workers: list[subprocess.Popen], stop: signal.Signals
) -> None:
    """Render's deploys send SIGTERM, Ctrl-C SIGINT: either way the chunk held goes back to the queue at once (no
    chunk is left running for its heartbeat to go stale), and the batch stays running."""
    job_id = upload(site)
    assert state(site, job_id).status == "queued"  # the web process only queued it
    workers.append(first := start_worker(site, 1))
    wait_until(site, job_id, lambda j: j.processed > 0, "started")  # mid-batch
    wait_until(site, job_id, lambda _: chunks_of(site, job_id, first, "running"), "held by the worker")
    first.send_signal(stop)
    assert first.wait(timeout=60) == 0, logs_in(site.logs)
    handed_back = state(site, job_id)
    assert handed_back.status == "running" and 0 < handed_back.processed < ROWS
    assert "running" not in {status for _, status, _ in chunks(site, job_id)}, logs_in(site.logs)

    workers.append(start_worker(site, 2))
    done = wait_until(site, job_id, lambda j: j.status == "finished", "finished")
    assert done.processed == ROWS
    assert_every_row_stored_once(site, job_id)


def test_two_deliveries_of_each_chunk_to_two_workers_run_it_once(site: Site, workers: list[subprocess.Popen]) -> None:
    engine = job_engine_of(site.app)
    job_id = stored_without_task(site, "twice.csv")
    for chunk_id, _, _ in chunks(site, job_id):
        engine.run_job(BATCH_CHUNKS.name, chunk_id)  # Huey's task itself, twice, past the pending mark
        engine.run_job(BATCH_CHUNKS.name, chunk_id)
    workers.extend([start_worker(site, 1), start_worker(site, 2)])
    done = wait_until(site, job_id, lambda j: j.status == "finished", "finished")
    assert done.processed == ROWS
    assert_every_row_stored_once(site, job_id)
    assert "is held by another worker or has ended" in logs_in(site.logs), "a second delivery was declined"


def test_a_job_queued_without_a_task_is_found_by_the_sweep(site: Site, workers: list[subprocess.Popen]) -> None:
    """A batch row made before the upgrade to the engine (or whose task was lost with the queue) still runs."""
    job_id = stored_without_task(site, "before.csv")
    assert job_engine_of(site.app).huey.storage.queue_size() == 0
    workers.append(start_worker(site, 1))
    assert wait_until(site, job_id, lambda j: j.status == "finished", "finished").processed == ROWS
    with site.app.app_context():
        assert db.session.scalar(select(func.count(Prediction.id)).where(Prediction.batch_id == job_id)) == ROWS


def test_gunicorn_only_queues_and_a_worker_process_runs_the_job(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    """`make run`'s processes: gunicorn (2 web workers) answers a replay request with 202 and the job is run by
    the job worker process beside it, not by a web worker."""
    defaults = tmp_path / "models"
    defaults.mkdir()
    shutil.copytree(make_bundle(seed=1), defaults / "test-tasks")
    env = app_env(tmp_path / "data", database_url_for(tmp_path / "data"), DEFAULT_BUNDLES_DIR=str(defaults))
    flask_cli(env, "db", "upgrade")
    flask_cli(env, "models", "import-defaults")
    candidate = flask_cli(env, "models", "import", str(make_bundle(seed=2))).splitlines()[-1]
    token = flask_cli(env, "tokens", "create", "root", "--role", "admin").splitlines()[-1]
    port = int(env["PORT"])
    with gunicorn(env, tmp_path / "gunicorn.log") as master:
        assert request(port, "POST", "/api/v1/predict", {"abstracts": abstracts[:12]})[0] == 200
        status, job = request(port, "POST", f"/api/v1/models/{candidate}/replay", {}, token=token)
        assert (status, job["status"]) == (202, "queued")
        web_workers = worker_pids(master.pid)
        worker = worker_process(env, tmp_path / "worker.log")
        try:
            while (answer := request(port, "GET", job["status_url"], token=token)[1])["status"] in (
                "queued",
                "running",
            ):
                assert worker.poll() is None, logs_in(tmp_path)
                time.sleep(0.05)
            assert answer["status"] == "finished" and answer["report"]["sample"]["size"] >= 12, answer
            with database(env) as conn:
                holder = conn.execute(select(ReplayReport.worker).where(ReplayReport.id == job["id"])).scalar()
            assert holder.startswith(prefix(worker)), (holder, worker.pid, web_workers)
            # The job worker yields the CPU to the pages: JOB_WORKER_NICE (10) below gunicorn's workers.
            ours = os.getpriority(os.PRIO_PROCESS, 0)
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in web_workers] == [ours] * len(web_workers)
            assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, ours + 10)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0, logs_in(tmp_path)


@pytest.mark.parametrize("nice", ["20", "-5"])
def test_a_worker_refuses_a_niceness_out_of_range(tmp_path: Path, nice: str) -> None:
    env = app_env(tmp_path / "data", database_url_for(tmp_path / "data"), JOB_WORKER_NICE=nice)
    worker = worker_process(env, tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 1
    said = (tmp_path / "worker.log").read_text()
    assert f"JOB_WORKER_NICE must be a whole number from 0 to 19, not {nice}" in said, said


def test_the_render_blueprint_runs_a_worker_service_on_the_web_services_database_and_queue() -> None:
    """render.yaml's worker service is built like the web service and reads the same settings, database and queue."""
    blueprint = yaml.safe_load((REPO / "render.yaml").read_text())
    services = {service["type"]: service for service in blueprint["services"]}
    web, worker, queue = services["web"], services["worker"], services["keyvalue"]
    assert worker["startCommand"] == "flask --app wsgi jobs worker"  # no migrations: the web service runs them
    assert worker["buildCommand"] == web["buildCommand"] and worker["runtime"] == web["runtime"]

    def sources(service: dict) -> dict[str, object]:
        return {
            var.get("key", "group"): var.get("fromDatabase") or var.get("fromService") or var.get("fromGroup")
            for var in service["envVars"]
        }

    shared = {"group", "DATABASE_URL", "REDIS_URL"}
    assert {key: sources(web)[key] for key in shared} == {key: sources(worker)[key] for key in shared}
    assert sources(web)["REDIS_URL"] == {"type": "keyvalue", "name": queue["name"], "property": "connectionString"}
    assert sources(web)["DATABASE_URL"]["name"] == blueprint["databases"][0]["name"]
    assert queue["maxmemoryPolicy"] == "noeviction"  # a full queue refuses a task rather than dropping one
    assert "disk" not in web, "a Render disk belongs to one service: the worker could not reach a database on it"


def test_an_upload_while_the_queue_is_down_is_stored_and_queued_by_the_sweep(
    tmp_path: Path, make_bundle: BundleFactory, redis_url: str
) -> None:
    """Redis away when a batch is uploaded: the upload still succeeds (the row is the record), and once the queue
    is back a worker's sweep queues the job."""
    data = tmp_path / "data"
    down = make_app(data, REDIS_URL=f"unix://{tmp_path}/no-redis-here.sock")
    try:
        with down.app_context():
            import_bundle(make_bundle(seed=1), actor="tests")
        response = signed_in(down, "cora", "curator").post(
            "/batches", data={"file": (io.BytesIO(batch_csv()), "down.csv")}, content_type="multipart/form-data"
        )
        assert response.status_code == 302, response.get_data(as_text=True)
        with down.app_context():
            assert db.session.scalar(select(BatchJob.status)) == "queued"
    finally:
        live_models_of(down).stop()
        with down.app_context():
            db.engine.dispose()
    redis.Redis.from_url(redis_url).flushdb()
    up = make_app(data, REDIS_URL=redis_url)
    try:
        chunk_count = -(-ROWS // up.config["BATCH_CHUNK_SIZE"])  # one task per chunk of the batch
        assert job_engine_of(up).sweep() == chunk_count
        assert job_engine_of(up).run_pending() == chunk_count
        with up.app_context():
            assert db.session.scalar(select(BatchJob.status)) == "finished"
            assert db.session.scalar(select(func.count(Prediction.id))) == ROWS
    finally:
        live_models_of(up).stop()
        with up.app_context():
            db.engine.dispose()


def test_a_worker_waits_rather_than_spins_while_redis_is_away(
    tmp_path: Path, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Huey's Redis storage took an unreachable Redis for an empty queue and its worker thread asked again at once
    (a core spent while Redis was away); ours waits before asking again."""
    app = make_app(tmp_path / "data", REDIS_URL=f"unix://{tmp_path}/no-redis-here.sock")
    slept: list[float] = []
    monkeypatch.setattr(jobs.time, "sleep", slept.append)
    try:
        assert job_engine_of(app).huey.dequeue() is None
        assert slept == [jobs.REDIS_RETRY_SECONDS]
    finally:
        live_models_of(app).stop()
        with app.app_context():
            db.engine.dispose()
