"""Trainer -> site round trip: corrections in, a bundle through the promotion gate, served by the site."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from tests.conftest import BundleFactory, make_app
from trainer.__main__ import main
from webapp.extensions import db
from webapp.models import AnnotationEvent, ApiToken, Taxonomy, User
from webapp.serving.bundle import read_manifest
from webapp.serving.registry import import_bundle
from webapp.serving.scoring import check_submission, predict_and_store
from webapp.training_runs import create_run, get_run

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = str(REPO / "trainer" / "configs" / "smoke.json")
# Trains real models: the SQLite pass of `make test` runs these, the PostgreSQL pass deselects them.
pytestmark = pytest.mark.trainer


def first_paper() -> dict:
    import gzip

    with gzip.open(REPO / "data" / "pwc-tasks" / "papers.jsonl.gz", "rt") as handle:
        return json.loads(handle.readline())


@pytest.fixture
def site_app(tmp_path: Path, make_bundle: BundleFactory) -> Flask:
    """A site whose research-tasks taxonomy serves a random tiny model, with one curator correction."""
    app = make_app(tmp_path / "site")
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug="research-tasks", name="Research tasks"), actor="tests")
        admin = User(name="admin", role="admin")
        db.session.add(admin)
        token, plain = ApiToken.issue(admin, "trainer")
        db.session.add(token)
        db.session.commit()
        paper = first_paper()
        [prediction] = predict_and_store([check_submission(paper["title"], paper["abstract"])], source="api")
        taxonomy = db.session.query(Taxonomy).filter_by(slug="research-tasks").one()
        result = prediction.results[0]
        db.session.add(
            AnnotationEvent(
                prediction_id=prediction.id,
                taxonomy_id=taxonomy.id,
                user_id=admin.id,
                added=["Image Classification"],
                removed=list(result.labels),
                note="fixed",
            )
        )
        db.session.commit()
    app.config["ADMIN_TOKEN"] = plain
    return app


@pytest.fixture
def site_url(site_app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, site_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_train_publish_over_http_is_then_served(site_app: Flask, site_url: str, tmp_path: Path, capsys) -> None:
    client = site_app.test_client()
    before = client.get("/healthz").get_json()
    out = tmp_path / "bundle"
    code = main(
        [
            "train",
            "--config",
            SMOKE_CONFIG,
            "--out",
            str(out),
            "--publish",
            site_url,
            "--token",
            site_app.config["ADMIN_TOKEN"],
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert version.startswith("research-tasks-") and version not in json.dumps(before)
    manifest = read_manifest(out)
    assert manifest.training_data["corrections"] == 1
    assert manifest.training_data["corrections_overriding"] == 1
    served = None
    while served != version:  # the watcher polls every second
        response = client.post("/api/v1/predict", json={"abstract": "We study object detection in aerial images."})
        served = response.get_json()["predictions"][0]["results"]["research-tasks"]["model_version"]
        time.sleep(0.2)
    with site_app.app_context():
        [run] = db.session.query(__import__("webapp.models", fromlist=["TrainingRun"]).TrainingRun).all()
        assert run.status == "finished" and run.candidate_version == version
        assert run.progress["total_steps"] > 0 and run.gate["passed"] is True


def test_worker_trains_a_run_queued_in_the_database(site_app: Flask, tmp_path: Path) -> None:
    database = site_app.config["SQLALCHEMY_DATABASE_URI"]
    with site_app.app_context():
        run_id = create_run("research-tasks", {"config": "smoke"}, requested_by="admin", queued=True).id
    work = ["--work-dir", str(tmp_path / "work")]
    assert main(["worker", "--database", database, "--once", "--runs-dir", str(tmp_path / "runs"), *work]) == 0
    with site_app.app_context():
        run = get_run(run_id)
        assert run.status == "finished", run.error
        taxonomy = db.session.query(Taxonomy).filter_by(slug="research-tasks").one()
        assert taxonomy.active_version_id == run.candidate_version
        assert run.metrics["micro_f1"] >= 0 and run.gate["candidate_micro_f1"] >= run.gate["active_micro_f1"]
    assert main(["worker", "--database", database, "--once", "--runs-dir", str(tmp_path / "runs"), *work]) == 0


def test_worker_marks_a_run_with_an_unknown_config_failed(site_app: Flask, tmp_path: Path) -> None:
    with site_app.app_context():
        run_id = create_run("research-tasks", {"config": "../secrets"}, requested_by="admin", queued=True).id
    database = site_app.config["SQLALCHEMY_DATABASE_URI"]
    work = ["--work-dir", str(tmp_path / "work")]
    assert main(["worker", "--database", database, "--once", "--runs-dir", str(tmp_path / "runs"), *work]) == 0
    with site_app.app_context():
        run = get_run(run_id)
        assert run.status == "failed" and "not in" in run.error


def test_unreachable_site_fails_before_training(tmp_path: Path, capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(
        [
            "train",
            "--config",
            SMOKE_CONFIG,
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "b"),
            "--publish",
            f"http://127.0.0.1:{port}",
            "--token",
            "pt_x",
        ]
    )
    assert code == 2
    assert "cannot reach" in capsys.readouterr().err
    # Before training: no encoder was fine-tuned or abstract encoded (the work dir was never made), no bundle written.
    assert not (tmp_path / "work").exists() and not (tmp_path / "b").exists()


def test_refused_token_fails_before_training(site_url: str, tmp_path: Path, capsys) -> None:
    code = main(
        [
            "train",
            "--config",
            SMOKE_CONFIG,
            "--out",
            str(tmp_path / "b"),
            "--publish",
            site_url,
            "--token",
            "pt_not-a-real-token",
        ]
    )
    assert code == 2
    assert "refused the token (HTTP 401)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_publishing_without_a_token_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PAPERTAG_TOKEN", raising=False)
    assert main(["train", "--config", SMOKE_CONFIG, "--publish", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    assert "needs an admin API token" in capsys.readouterr().err
