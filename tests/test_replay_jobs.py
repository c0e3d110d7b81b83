"""Replay as a background job (issue 12 point 7) on the job engine CSV batches use: queued by the page or the API,
claimed by one worker, progress committed chunk by chunk with a heartbeat, taken over from a process that died
(stale heartbeat) and started again, never finished twice, with a page that polls its progress. The tests play the
workers (tests/test_job_engine.py runs real worker processes)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests import test_replay
from tests.conftest import BundleFactory, signed_in
from tests.test_replay import SLUG, import_version, predicted_sets, token, wait_for_replay
from webapp.extensions import db
from webapp.jobs import engine as jobs
from webapp.jobs.engine import EXTENSION_KEY as JOB_RUNNER
from webapp.jobs.replay import REPLAY_JOBS, process_replay, queue_replay
from webapp.models import ReplayReport, Taxonomy, utcnow
from webapp.serving.registry import activate

stored = test_replay.stored  # the fixture: twelve stored predictions, three of them reviewed


@pytest.fixture
def app(app: Flask) -> Flask:
    app.config["BATCH_CHUNK_SIZE"] = 5  # 12 stored abstracts: three chunks, so progress moves in steps
    return app


def job(app: Flask, report_id: int) -> ReplayReport:
    with app.app_context():
        found = db.session.get(ReplayReport, report_id)
        db.session.expunge(found)
        return found


def queued(app: Flask, version_id: str) -> int:
    with app.app_context():
        return queue_replay(version_id, actor="tests").id


def test_a_replay_left_by_a_dead_process_is_taken_over_and_finished_once(
    app: Flask, make_bundle: BundleFactory, stored: dict
) -> None:
    candidate = import_version(app, make_bundle, 2)
    report_id = queued(app, candidate)
    assert (job(app, report_id).status, job(app, report_id).processed) == ("queued", 0)
    with app.app_context():
        assert jobs.claim(REPLAY_JOBS, "dead-host:1") == report_id
        row = db.session.get(ReplayReport, report_id)
        row.processed, row.sample_size, row.heartbeat_at = 5, 12, utcnow() - timedelta(hours=1)
        db.session.commit()
        assert jobs.claim(REPLAY_JOBS, "alive:2") == report_id  # stale: taken over
        assert jobs.claim(REPLAY_JOBS, "alive:3") is None  # held, with a fresh heartbeat
        process_replay(report_id, "alive:2")
        process_replay(report_id, "dead-host:1")  # the old holder wakes up: it must change nothing
    done = job(app, report_id)
    assert (done.status, done.worker, done.processed, done.sample_size) == ("finished", "alive:2", 12, 12)
    assert done.error is None and done.finished_at is not None
    active = predicted_sets(make_bundle, 1, stored["texts"])
    candidates = predicted_sets(make_bundle, 2, stored["texts"])
    assert done.report["changed"] == sum(a != c for a, c in zip(active, candidates, strict=True))
    assert done.report["sample"] == {"size": 12, "reviewed": 3}


def test_a_worker_that_lost_its_replay_writes_nothing(app: Flask, make_bundle: BundleFactory, stored: dict) -> None:
    candidate = import_version(app, make_bundle, 2)
    report_id = queued(app, candidate)
    with app.app_context():
        assert jobs.claim(REPLAY_JOBS, "slow:1") == report_id
        db.session.get(ReplayReport, report_id).heartbeat_at = utcnow() - timedelta(hours=1)
        db.session.commit()
        assert jobs.claim(REPLAY_JOBS, "fast:2") == report_id
        process_replay(report_id, "slow:1")
    lost = job(app, report_id)
    assert (lost.status, lost.worker, lost.processed, lost.report) == ("running", "fast:2", 0, {})
    with app.app_context():
        process_replay(report_id, "fast:2")
    assert job(app, report_id).status == "finished"


def test_progress_is_committed_chunk_by_chunk(app: Flask, make_bundle: BundleFactory, stored: dict) -> None:
    """Each chunk's heartbeat carries the count so far: what the page's bar shows while it runs."""
    candidate = import_version(app, make_bundle, 2)
    report_id = queued(app, candidate)
    seen: list[int] = []
    original = jobs.heartbeat

    def spying(model, job_id, worker, **values):  # noqa: ANN001, ANN202
        if "processed" in values:
            seen.append(values["processed"])
        return original(model, job_id, worker, **values)

    jobs.heartbeat = spying
    try:
        with app.app_context():
            assert jobs.claim(REPLAY_JOBS, "w:1") == report_id
            process_replay(report_id, "w:1")
    finally:
        jobs.heartbeat = original
    assert seen == [0, 5, 10, 12]


def test_the_page_and_the_api_follow_one_job(app: Flask, client: FlaskClient, make_bundle: BundleFactory) -> None:
    candidate = import_version(app, make_bundle, 2)
    admin = signed_in(app, "ada", "admin")
    headers = token(app, "root", "admin")
    report_id = queued(app, candidate)
    # Asking again while it waits finds the same job (page and API), so a double click queues nothing twice.
    again = client.post(f"/api/v1/models/{candidate}/replay", headers=headers)
    assert again.status_code == 202 and again.get_json()["id"] == report_id
    admin.post(f"/models/{candidate}/replay")
    with app.app_context():
        assert db.session.query(ReplayReport).count() == 1
    wait_for_replay(app, report_id)

    with app.app_context():  # a second replay, queued and not yet run (no worker here): the page shows its bar
        report_id = queue_replay(candidate, actor="ada").id
    page = admin.get(f"/models/{candidate}/replay").get_data(as_text=True)
    status_url = f"/models/{candidate}/replay/{report_id}/status"
    assert f'data-poll-url="{status_url}" data-poll-status="queued"' in page and "<progress" in page
    assert "js/poll.js" in page and "What would change" in page  # the previous report stays readable meanwhile
    assert "Replay again</button>" in page and " disabled>Replay again" in page
    status = admin.get(status_url).get_json()
    assert (status["status"], status["processed"], status["percent"]) == ("queued", 0, 0)
    assert status["status_url"] == f"/api/v1/replays/{report_id}"
    assert client.get(status["status_url"], headers=token(app, "cora", "curator")).get_json()["status"] == "queued"
    assert admin.get(f"/models/{candidate}/replay/999/status").status_code == 404
    assert signed_in(app, "cleo", "curator").get(status_url).status_code == 403
    assert client.get(status_url).status_code == 302  # anonymous: the sign-in page
    assert client.get("/api/v1/replays/999", headers=headers).status_code == 404
    # GET latest keeps answering with the newest finished report while a newer one waits.
    latest = client.get(f"/api/v1/models/{candidate}/replay", headers=headers).get_json()
    assert latest["status"] == "finished" and latest["id"] == report_id - 1 and latest["report"]["sample"]


def test_the_active_version_is_read_when_the_replay_runs(app: Flask, make_bundle: BundleFactory, stored: dict) -> None:
    candidate = import_version(app, make_bundle, 2)
    report_id = queued(app, candidate)
    third = import_version(app, make_bundle, 3)
    with app.app_context():
        activate(third, actor="tests")
        assert jobs.claim(REPLAY_JOBS, "w:1") == report_id
        process_replay(report_id, "w:1")
    assert job(app, report_id).active_version_id == third
    # A candidate activated before its replay ran: the job fails, saying why.
    other = queued(app, import_version(app, make_bundle, 4))
    with app.app_context():
        activate(job(app, other).candidate_version_id, actor="tests")
        assert jobs.claim(REPLAY_JOBS, "w:1") == other
        process_replay(other, "w:1")
    failed = job(app, other)
    assert failed.status == "failed" and "is the active" in failed.error and failed.report == {}


def test_batches_and_replays_share_one_engine(app: Flask, client: FlaskClient, make_bundle: BundleFactory) -> None:
    engine = app.extensions[JOB_RUNNER]
    assert list(engine.kinds) == ["batch-chunk", "replay"]
    with app.app_context():
        assert db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == SLUG))
    report_id = queued(app, import_version(app, make_bundle, 2))
    assert engine.run_pending() == 0 and job(app, report_id).status == "queued"  # a row alone is not a task
    with app.app_context():
        assert jobs.enqueue(REPLAY_JOBS, report_id)
        assert not jobs.enqueue(REPLAY_JOBS, report_id)  # one task pending for it is enough
    assert engine.run_pending() == 1
    assert job(app, report_id).status == "finished"
