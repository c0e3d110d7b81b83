"""Issue 12 point 2: every reader shows the *current* labels (the model's with the active corrections applied):
history chips and label filter, the prediction page, exports, similar papers; with the review and the model's
labels beside them; and a page of rows reads its events in a fixed number of queries."""

from __future__ import annotations

import csv
import io
import json
import threading

import flask_migrate
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, inspect, select

from tests.conftest import live_models_of
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import PredictionResult

SLUG = "test-tasks"


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:12]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


@pytest.fixture
def headers(app: Flask) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", "cora", "--role", "curator"])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def _model(app: Flask, pid: int) -> list[str]:
    with app.app_context():
        return sorted(db.session.scalar(select(PredictionResult.labels).where(PredictionResult.prediction_id == pid)))


def _review(client: FlaskClient, headers: dict[str, str], pid: int, **body: object) -> dict:
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json={"taxonomy": SLUG, **body}, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _found(client: FlaskClient, label: str) -> set[int]:
    page = client.get("/history", query_string={"label": label}).get_data(as_text=True)
    return {int(chunk.split("<", 1)[0]) for chunk in page.split("<span>#")[1:]}


@pytest.fixture
def corrected(app: Flask, client: FlaskClient, headers: dict[str, str], predicted: list[int]) -> tuple[int, str, str]:
    """A prediction a curator corrected: (its id, a label they removed, a label they added)."""
    pid = next(p for p in predicted if _model(app, p))
    model = _model(app, pid)
    removed, added = model[0], next(label for label in LABELS if label not in model)
    _review(client, headers, pid, labels=[*model[1:], added])
    return pid, removed, added


def test_the_label_filter_finds_added_labels_and_not_removed_ones(
    app: Flask, client: FlaskClient, headers: dict[str, str], predicted: list[int], corrected: tuple[int, str, str]
) -> None:
    pid, removed, added = corrected
    with_removed = {p for p in predicted if removed in _model(app, p)} - {pid}
    assert _found(client, added) == {p for p in predicted if added in _model(app, p)} | {pid}
    assert _found(client, removed) == with_removed
    _review(client, headers, pid, action="undo")  # back to the model's labels
    assert pid in _found(client, removed) and pid not in _found(client, added)
    _review(client, headers, pid, action="accept")
    assert pid in _found(client, removed), "an accept changes no label"


def test_history_shows_current_labels_the_review_and_the_models_labels(
    app: Flask, client: FlaskClient, corrected: tuple[int, str, str]
) -> None:
    pid, removed, added = corrected
    page = client.get("/history").get_data(as_text=True)
    item = page.split(f"<span>#{pid}</span>")[1].split('<li class="card history-item">')[0]
    chips, model = item.split("<details", 1)
    assert f'<li class="chip">{added}</li>' in chips and f'<li class="chip">{removed}</li>' not in chips
    assert 'data-review="corrected"' in chips and '<span class="badge ok">reviewed</span>' in chips  # names: PEOPLE
    assert "The model's labels" in model and f'<li class="chip">{removed}</li>' in model
    assert client.get("/history?reviewed=yes").get_data(as_text=True).count('class="card history-item"') == 1


def test_the_prediction_page_shows_current_labels_before_the_models(
    client: FlaskClient, corrected: tuple[int, str, str]
) -> None:
    pid, removed, added = corrected
    page = client.get(f"/predictions/{pid}").get_data(as_text=True)
    current = page.split('class="card current-labels"')[1].split("</section>")[0]
    assert f'<li class="chip">{added}</li>' in current and f'<li class="chip">{removed}</li>' not in current
    assert 'data-review="corrected"' in current
    assert page.index("current-labels") < page.index("What the model said")
    assert "added " + added in page and "removed " + removed in page  # the event, in words


def test_exports_carry_current_labels_and_the_review(
    app: Flask,
    client: FlaskClient,
    headers: dict[str, str],
    predicted: list[int],
    corrected: tuple[int, str, str],
) -> None:
    pid, removed, added = corrected
    accepted, skipped = [p for p in predicted if p != pid][:2]
    _review(client, headers, accepted, action="accept")
    _review(client, headers, skipped, action="skip")
    lines = client.get("/api/v1/predictions.jsonl", headers=headers).get_data(as_text=True).splitlines()
    records = {r["id"]: r["results"][SLUG] for r in map(json.loads, lines)}
    assert added in records[pid]["labels"] and removed not in records[pid]["labels"]
    assert removed in records[pid]["predicted"] and records[pid]["review"] == "corrected"
    assert records[accepted]["review"] == "accepted" and records[accepted]["reviewed"] is True
    assert records[skipped]["review"] is None and records[skipped]["reviewed"] is False
    rows = list(
        csv.DictReader(io.StringIO(client.get("/api/v1/predictions.csv", headers=headers).get_data(as_text=True)))
    )
    row = next(r for r in rows if r["id"] == str(pid))
    assert added in row[f"{SLUG}.labels"].split("|") and row[f"{SLUG}.review"] == "corrected"
    annotations = client.get("/api/v1/annotations.csv", headers=headers).get_data(as_text=True)
    reviews = {r["id"]: r["review"] for r in csv.DictReader(io.StringIO(annotations))}
    assert reviews == {str(pid): "corrected", str(accepted): "accepted"}, "a skip is no gold data"
    jsonl = client.get("/api/v1/annotations", headers=headers).get_data(as_text=True).splitlines()
    kinds = {r["id"]: [e["kind"] for e in r["events"]] for r in map(json.loads, jsonl)}
    assert kinds == {pid: ["correction"], accepted: ["accepted"]}


def test_similar_papers_show_current_labels_and_the_models(
    app: Flask, client: FlaskClient, predicted: list[int], corrected: tuple[int, str, str]
) -> None:
    pid, removed, added = corrected
    other = next(p for p in predicted if p != pid)
    found = client.get(f"/api/v1/predictions/{other}/similar?k=20").get_json()["results"][SLUG]["similar"]
    (paper,) = (p for p in found if p["id"] == pid)
    assert added in paper["labels"] and removed not in paper["labels"] and removed in paper["predicted"]
    assert paper["reviewed"] is True and paper["review"] == "corrected"


def _statements(app: Flask, client: FlaskClient, path: str) -> int:
    """Statements the request for ``path`` runs. The test client serves it in this thread; the model watcher and the
    job runner poll the same engine from theirs, and their polls must not count (they made this test flaky)."""
    count, request_thread = 0, threading.get_ident()

    def counter(*_: object) -> None:
        nonlocal count
        if threading.get_ident() == request_thread:
            count += 1

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", counter)
    try:
        assert client.get(path).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", counter)
    return count


def test_a_history_page_reads_its_labels_in_a_fixed_number_of_queries(
    app: Flask, client: FlaskClient, headers: dict[str, str], predicted: list[int]
) -> None:
    """No N+1: the queries for a page do not grow with how many of its rows were reviewed."""
    _review(client, headers, predicted[0], action="accept")
    _statements(app, client, "/history")  # once first: a new connection's own set-up queries are not the page's
    few = _statements(app, client, "/history")
    for pid in predicted[1:]:
        _review(client, headers, pid, action="accept")
    many = _statements(app, client, "/history")
    assert many == few, (few, many)


def _rows(app: Flask) -> set[tuple[int, str]]:
    with app.app_context():
        return {
            (r.result_id, r.label) for r in db.session.execute(db.text("SELECT result_id, label FROM current_labels"))
        }


def _taxonomies(app: Flask) -> set[tuple[int, int]]:
    """(result id, taxonomy id) of the current_labels rows."""
    with app.app_context():
        return set(db.session.execute(db.text("SELECT result_id, taxonomy_id FROM current_labels")).all())


def test_the_current_labels_table_is_kept_by_reviews_and_backfilled_by_its_migration(
    app: Flask, client: FlaskClient, headers: dict[str, str], predicted: list[int], corrected: tuple[int, str, str]
) -> None:
    """The filter's rows: written by the review command for corrected results only, each with its result's
    taxonomy, and rebuilt the same from the stored events by migration 0011 on a database that predates it (undone
    corrections included), their taxonomies by migration 0020."""
    pid, removed, added = corrected
    undone, accepted = [p for p in predicted if p != pid][:2]
    _review(client, headers, undone, labels=[])
    _review(client, headers, undone, action="undo")
    _review(client, headers, accepted, action="accept")
    kept = _rows(app)
    with app.app_context():
        result_ids = dict(db.session.execute(select(PredictionResult.prediction_id, PredictionResult.id)).all())
    assert {label for rid, label in kept if rid == result_ids[pid]} == set(_model(app, pid)) - {removed} | {added}
    assert {label for rid, label in kept if rid == result_ids[undone]} == set(_model(app, undone))
    assert not any(rid == result_ids[accepted] for rid, _ in kept), "an accept changes no label: no rows"
    taxonomies = _taxonomies(app)
    with app.app_context():
        result_taxonomies = set(db.session.execute(select(PredictionResult.id, PredictionResult.taxonomy_id)).all())
    assert taxonomies and taxonomies <= result_taxonomies
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()
        flask_migrate.downgrade(revision="0010_fulltext_search")
        assert "current_labels" not in inspect(db.engine).get_table_names()
        flask_migrate.upgrade()
        db.engine.dispose()
    assert _rows(app) == kept and _taxonomies(app) == taxonomies
    assert pid in _found(client, added) and pid not in _found(client, removed)


def test_the_filter_reads_a_curators_labels_through_later_renames(
    app: Flask, client: FlaskClient, corrected: tuple[int, str, str]
) -> None:
    """The current_labels rows keep the names of their time; a rename made later finds them by the new name."""
    pid, _, added = corrected
    result = app.test_cli_runner().invoke(args=["tokens", "create", "ada", "--role", "admin"])
    admin = {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}
    body = {"kind": "rename", "from": added, "to": "Renamed Task"}
    assert client.post(f"/api/v1/taxonomies/{SLUG}/label-changes", json=body, headers=admin).status_code == 201
    assert pid in _found(client, "Renamed Task") and pid not in _found(client, added)


def test_a_label_a_curator_proposed_is_a_known_label_of_the_filter(
    app: Flask, client: FlaskClient, headers: dict[str, str], predicted: list[int]
) -> None:
    """A pending proposal exists only in corrections: the filter knows it (no "No label reads"), in any case, and
    suggests it."""
    pid = predicted[0]
    _review(client, headers, pid, labels=_model(app, pid), propose=["My Proposed Task"])
    for typed in ("My Proposed Task", "my proposed task", "MY_PROPOSED-task"):
        page = client.get("/history", query_string={"label": typed, "taxonomy": SLUG}).get_data(as_text=True)
        assert "data-label-unknown" not in page and "1 prediction<" in page, typed
        assert _found(client, typed) == {pid}, typed
    suggested = client.get(f"/api/v1/label-suggestions?taxonomy={SLUG}&q=proposed").get_json()["taxonomies"]
    assert suggested[0]["labels"] == ["My Proposed Task"]
