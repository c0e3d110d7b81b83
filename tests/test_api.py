"""The JSON API and /healthz, exactly as PRODUCT.md states them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, live_models_of, make_app
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import Prediction, PredictionResult
from webapp.serving.registry import import_bundle


def test_predict_single_returns_contract_shape(client: FlaskClient, app: Flask, abstracts: list[dict]) -> None:
    paper = abstracts[0]
    response = client.post("/api/v1/predict", json={"title": paper["title"], "abstract": paper["abstract"]})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert list(body) == ["predictions"]
    (prediction,) = body["predictions"]
    assert set(prediction) == {"id", "results"}
    result = prediction["results"]["test-tasks"]
    assert set(result) == {
        "model_version",
        "labels",
        "scores",
        "below_threshold",
        "off_domain",
        "tokens_read",
        "tokens_total",
        "lexical_whole_text",
    }
    assert result["model_version"].startswith("test-tasks-")
    assert set(result["scores"]) == set(LABELS)
    assert all(0.0 <= p <= 1.0 for p in result["scores"].values())
    # Predicted = every label at or over its threshold (0.5 in the test bundle), highest first.
    expected = sorted((label for label, p in result["scores"].items() if p >= 0.5), key=lambda x: -result["scores"][x])
    assert result["labels"] == expected
    # The test bundle asks for no best guess, has no off-domain cut and reads one window of 128 tokens ([CLS] and
    # [SEP] among them), shorter than this abstract; its head has no lexical part.
    assert result["below_threshold"] is False and result["off_domain"] is False
    assert result["tokens_read"] == 126 < result["tokens_total"] and result["lexical_whole_text"] is False
    with app.app_context():
        stored = db.session.get(Prediction, prediction["id"])
        assert stored is not None and stored.source == "api" and stored.title == paper["title"]
        (row,) = stored.results
        assert row.model_version_id == result["model_version"]
        assert row.thresholds == {label: 0.5 for label in LABELS}
        assert row.labels == result["labels"]
        assert row.embedding is not None and len(row.embedding.vector) == 32  # int8, one byte a dimension


def test_predict_batch_keeps_order_and_matches_single(client: FlaskClient, abstracts: list[dict]) -> None:
    batch = [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:10]]
    response = client.post("/api/v1/predict", json={"abstracts": batch})
    assert response.status_code == 200
    predictions = response.get_json()["predictions"]
    assert len(predictions) == 10 and len({p["id"] for p in predictions}) == 10
    single = client.post("/api/v1/predict", json=batch[3]).get_json()["predictions"][0]
    assert single["results"]["test-tasks"]["scores"] == predictions[3]["results"]["test-tasks"]["scores"]


def test_predict_title_is_optional(client: FlaskClient, abstracts: list[dict]) -> None:
    response = client.post("/api/v1/predict", json={"abstract": abstracts[1]["abstract"]})
    assert response.status_code == 200
    assert response.get_json()["predictions"][0]["results"]["test-tasks"]["labels"] is not None


def test_taxonomies_lists_labels_and_active_version(client: FlaskClient) -> None:
    body = client.get("/api/v1/taxonomies").get_json()
    (taxonomy,) = body["taxonomies"]
    assert taxonomy["slug"] == "test-tasks" and taxonomy["name"] == "Test tasks"
    assert taxonomy["labels"] == LABELS
    assert taxonomy["active_version"] in taxonomy["versions"]


def test_healthz_reports_active_and_loaded_versions(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    (version,) = body["active"].values()
    assert body["worker"]["loaded"] == {"test-tasks": version}
    assert body["worker"]["errors"] == {}


def test_predict_without_any_model_is_a_clear_503(empty_app: Flask, abstracts: list[dict]) -> None:
    client = empty_app.test_client()
    response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
    assert response.status_code == 503
    assert "no model is active" in response.get_json()["error"]
    with empty_app.app_context():
        assert db.session.query(Prediction).count() == 0
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["active"] == {}


def test_security_headers_on_every_response(client: FlaskClient) -> None:
    for path in ("/", "/history", "/api/v1/taxonomies", "/healthz", "/nope"):
        response = client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_scores_stored_for_every_label(client: FlaskClient, app: Flask, abstracts: list[dict]) -> None:
    client.post("/api/v1/predict", json={"abstract": abstracts[2]["abstract"]})
    with app.app_context():
        row = db.session.query(PredictionResult).one()
        assert list(row.scores) == LABELS
        assert abs(row.margin - min(abs(row.scores[label] - 0.5) for label in LABELS)) < 1e-5


def test_no_model_is_loaded_before_the_first_request(app: Flask, client: FlaskClient) -> None:
    """onnxruntime sessions must be created after gunicorn forks: building the app loads nothing."""
    live = live_models_of(app)
    assert live.loaded() == {} and live._thread is None
    health = client.get("/healthz").get_json()
    assert health["worker"]["loaded"] and health["worker"]["ort_threads"] == 1


def test_each_web_worker_gets_one_onnxruntime_thread_per_core_unless_told(tmp_path: Path) -> None:
    """Idle intra-op threads sleep, so every worker may use every core, however many workers there are."""
    cores = len(os.sched_getaffinity(0))
    for workers in (1, 4):
        app = make_app(tmp_path / f"workers-{workers}", ORT_THREADS=0, WEB_CONCURRENCY=workers)
        assert live_models_of(app).threads == cores
    assert live_models_of(make_app(tmp_path / "told", ORT_THREADS=3, WEB_CONCURRENCY=4)).threads == 3


@pytest.fixture
def two_taxonomies(app: Flask, make_bundle: BundleFactory) -> Flask:
    """The app with a second active taxonomy, ``test-topics``."""
    with app.app_context():
        assert import_bundle(make_bundle(seed=2, slug="test-topics", name="Test topics"), actor="tests").activated
    return app


def stored_results(app: Flask) -> list[tuple[int, str]]:
    with app.app_context():
        return sorted(
            (row.prediction_id, row.taxonomy.slug) for row in db.session.scalars(select(PredictionResult)).all()
        )


def test_predict_answers_only_the_taxonomies_asked_for(
    two_taxonomies: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    paper = {"title": abstracts[0]["title"], "abstract": abstracts[0]["abstract"]}
    everything = client.post("/api/v1/predict", json=paper).get_json()["predictions"][0]
    assert set(everything["results"]) == {"test-tasks", "test-topics"}

    response = client.post("/api/v1/predict", json={**paper, "taxonomies": ["test-topics"]})
    assert response.status_code == 200, response.get_json()
    (only,) = response.get_json()["predictions"]
    assert set(only["results"]) == {"test-topics"}
    assert only["results"]["test-topics"] == everything["results"]["test-topics"]

    batch = {"abstracts": [paper, {"abstract": abstracts[1]["abstract"]}], "taxonomies": ["test-tasks"]}
    predictions = client.post("/api/v1/predict", json=batch).get_json()["predictions"]
    assert [set(p["results"]) for p in predictions] == [{"test-tasks"}, {"test-tasks"}]
    both = client.post("/api/v1/predict", json={**paper, "taxonomies": ["test-tasks", "test-topics"]})
    (both,) = both.get_json()["predictions"]
    assert set(both["results"]) == {"test-tasks", "test-topics"}

    # Only what was answered is stored.
    assert stored_results(two_taxonomies) == sorted(
        [(everything["id"], "test-tasks"), (everything["id"], "test-topics"), (only["id"], "test-topics")]
        + [(p["id"], "test-tasks") for p in predictions]
        + [(both["id"], "test-tasks"), (both["id"], "test-topics")]
    )


@pytest.mark.parametrize(
    ("taxonomies", "message"),
    [
        (["nope"], "no active model for taxonomies ['nope']"),
        (["test-tasks", "nope"], "no active model for taxonomies ['nope']"),
        ("test-tasks", "taxonomies must be a non-empty list of taxonomy slugs"),
        ({"test-tasks": True}, "taxonomies must be a non-empty list of taxonomy slugs"),
        ([], "taxonomies must be a non-empty list of taxonomy slugs"),
        ([1], "taxonomies must be a non-empty list of taxonomy slugs"),
        (["test-tasks", None], "taxonomies must be a non-empty list of taxonomy slugs"),
    ],
)
def test_bad_taxonomies_are_400_and_store_nothing(
    two_taxonomies: Flask, client: FlaskClient, abstracts: list[dict], taxonomies: object, message: str
) -> None:
    response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"], "taxonomies": taxonomies})
    assert response.status_code == 400
    assert message in response.get_json()["error"], response.get_json()
    with two_taxonomies.app_context():
        assert db.session.query(Prediction).count() == 0
        assert db.session.query(PredictionResult).count() == 0


def test_a_label_change_renames_only_its_taxonomys_answers_read_in_one_query(
    two_taxonomies: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    """Both taxonomies share label names; a rename in one shows in that one's answer only. A predict call reads the
    label changes of every taxonomy in one query and looks up no taxonomy row (its models know their slugs)."""
    from sqlalchemy import event

    from tests.test_label_surgery import token

    paper = {"title": abstracts[0]["title"], "abstract": abstracts[0]["abstract"]}
    before = client.post("/api/v1/predict", json=paper).get_json()["predictions"][0]["results"]
    old = before["test-tasks"]["labels"][0]
    assert old in before["test-topics"]["scores"]
    rename = {"kind": "rename", "from": old, "to": "Renamed Task"}
    made = client.post("/api/v1/taxonomies/test-tasks/label-changes", json=rename, headers=token(two_taxonomies))
    assert made.status_code == 201, made.get_json()

    statements: list[str] = []
    with two_taxonomies.app_context():
        engine = db.engine

    def seen(_conn, _cursor, statement: str, *_args) -> None:  # noqa: ANN001 - SQLAlchemy's event signature
        statements.append(" ".join(statement.split()).lower())

    event.listen(engine, "before_cursor_execute", seen)
    try:
        after = client.post("/api/v1/predict", json=paper).get_json()["predictions"][0]["results"]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert "Renamed Task" in after["test-tasks"]["labels"] and old not in after["test-tasks"]["scores"]
    assert after["test-topics"] == before["test-topics"]
    assert sum("from label_changes" in s for s in statements) == 1
    assert not [s for s in statements if "from taxonomies" in s]
