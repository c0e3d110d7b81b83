"""Replay before promotion on the real app: predictions stored through the predict API, corrections recorded
through the annotations API, then a candidate (another real tiny bundle of the same taxonomy) replayed through
the API and the pages; its figures are checked against the two bundles scored directly with LoadedModel."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import BundleFactory, signed_in
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.jobs.engine import EXTENSION_KEY as JOB_RUNNER
from webapp.jobs.replay import sample
from webapp.models import ModelArtifact, ModelVersion, ReplayReport, Taxonomy, TrainingRun
from webapp.serving.bundle import compose_text
from webapp.serving.inference import LoadedModel
from webapp.serving.registry import activate, import_bundle

SLUG = "test-tasks"


def token(app: Flask, name: str, role: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def import_version(app: Flask, make_bundle: BundleFactory, seed: int) -> str:
    with app.app_context():
        return import_bundle(make_bundle(seed=seed), actor="tests").version.id


def predicted_sets(make_bundle: BundleFactory, seed: int, texts: list[str]) -> list[set[str]]:
    """A bundle's labels for each text, scored directly (no app, no registry)."""
    model = LoadedModel(make_bundle(seed=seed))
    scored = model.score(texts)
    return [
        {label for label, p, t in zip(model.labels, s.probabilities, model.thresholds, strict=True) if p >= t}
        for s in scored
    ]


def wait_for_replay(app: Flask, report_id: int) -> str:
    """Run the app's pending jobs here until the replay ended (the app's own runner thread may take it first);
    returns its status."""
    while True:
        app.extensions[JOB_RUNNER].run_pending()
        with app.app_context():
            status = db.session.get(ReplayReport, report_id).status
        if status in ("finished", "failed"):
            return status
        time.sleep(0.05)


def replayed(app: Flask, client: FlaskClient, version_id: str, headers: dict[str, str]) -> dict:
    """POST a replay through the API (202 with the job), wait for it, and return what its status URL answers."""
    response = client.post(f"/api/v1/models/{version_id}/replay", headers=headers)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["status"] == "queued" and response.headers["Location"] == job["status_url"]
    assert job["status_url"] == f"/api/v1/replays/{job['id']}"
    wait_for_replay(app, job["id"])
    body = client.get(job["status_url"], headers=headers).get_json()
    assert body["status"] == "finished", body
    return body


def replay_count(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count(ReplayReport.id)))


@pytest.fixture
def stored(app: Flask, client: FlaskClient, abstracts: list[dict], make_bundle: BundleFactory) -> dict:
    """Twelve predictions by the active seed-1 version, three of them corrected through the API: #0 to what the
    seed-2 candidate predicts, #1 back to its own prediction (an add then a remove), #2 to two fixed labels."""
    papers = abstracts[:12]
    response = client.post("/api/v1/predict", json={"abstracts": papers})
    assert response.status_code == 200
    ids = [p["id"] for p in response.get_json()["predictions"]]
    texts = [compose_text(p["title"], p["abstract"]) for p in papers]
    active, candidate = predicted_sets(make_bundle, 1, texts), predicted_sets(make_bundle, 2, texts)
    assert active != candidate, "the two tiny bundles must disagree somewhere for the test to mean anything"
    changed = [i for i in range(len(texts)) if active[i] != candidate[i]]
    headers = token(app, "cora", "curator")
    # The tiny tokenizer (and so the tiny models' answers) can differ between processes: pick what the corrections
    # need from what the models answered this time.
    first = changed[0]
    second = next(i for i in changed[1:] if set(LABELS) - active[i])
    third = next(i for i in range(len(texts)) if i not in (first, second))
    extra = sorted(set(LABELS) - active[second])[0]
    corrections = [
        (first, sorted(candidate[first])),
        (second, sorted(active[second] | {extra})),
        (second, sorted(active[second])),
        (third, ["Code Generation", "Speech Recognition"]),
    ]
    for i, labels in corrections:
        body = {"taxonomy": SLUG, "labels": labels, "note": "replay test"}
        answer = client.post(f"/api/v1/predictions/{ids[i]}/annotations", json=body, headers=headers)
        assert answer.status_code == 201, answer.get_json()
    gold = {first: candidate[first], second: active[second], third: {"Code Generation", "Speech Recognition"}}
    return {"ids": ids, "texts": texts, "gold": gold, "reviewed_order": [third, second, first]}


def expected_figures(ids: list[int], active: list[set[str]], candidate: list[set[str]], gold: dict) -> dict:
    """The report's numbers, computed here the plain way from the directly scored label sets."""
    gained = Counter(label for a, c in zip(active, candidate, strict=True) for label in c - a)
    lost = Counter(label for a, c in zip(active, candidate, strict=True) for label in a - c)

    def f1(side: list[set[str]]) -> float | None:
        tp = sum(len(side[i] & g) for i, g in gold.items())
        fp = sum(len(side[i] - g) for i, g in gold.items())
        fn = sum(len(g - side[i]) for i, g in gold.items())
        return round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None

    return {
        "changed": sum(a != c for a, c in zip(active, candidate, strict=True)),
        "gained": dict(gained),
        "lost": dict(lost),
        "active": dict(Counter(label for a in active for label in a)),
        "candidate": dict(Counter(label for c in candidate for label in c)),
        "active_micro_f1": f1(active),
        "candidate_micro_f1": f1(candidate),
        "now_right": sorted(ids[i] for i, g in gold.items() if candidate[i] == g != active[i]),
        "now_wrong": sorted(ids[i] for i, g in gold.items() if active[i] == g != candidate[i]),
        # a label the two disagree on is fixed when the active got it wrong, broken when it got it right
        "fixed": sum(len((active[i] ^ candidate[i]) & (active[i] ^ g)) for i, g in gold.items()),
        "broken": sum(len((active[i] ^ candidate[i]) - (active[i] ^ g)) for i, g in gold.items()),
    }


def check_report(report: dict, expected: dict, size: int, reviewed: int) -> None:
    assert report["sample"] == {"size": size, "reviewed": reviewed}
    assert report["changed"] == expected["changed"]
    assert report["gained"] == sum(expected["gained"].values()) and report["lost"] == sum(expected["lost"].values())
    rows = {row["label"]: row for row in report["per_label"]}
    for key in ("gained", "lost", "active", "candidate"):
        assert {label: row[key] for label, row in rows.items() if row[key]} == expected[key], key
    assert sum(row["fixed"] for row in rows.values()) == expected["fixed"] == report["reviewed"]["labels_fixed"]
    assert sum(row["broken"] for row in rows.values()) == expected["broken"] == report["reviewed"]["labels_broken"]
    figures = report["reviewed"]
    assert figures["count"] == reviewed
    assert figures["active_micro_f1"] == expected["active_micro_f1"]
    assert figures["candidate_micro_f1"] == expected["candidate_micro_f1"]
    assert sorted(row["id"] for row in figures["now_right"]) == expected["now_right"]
    assert sorted(row["id"] for row in figures["now_wrong"]) == expected["now_wrong"]


def test_api_replay_matches_a_direct_computation(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, stored: dict
) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    headers = token(app, "root", "admin")
    body = replayed(app, client, candidate_id, headers)
    assert body["processed"] == body["sample_size"] == 12 and body["percent"] == 100
    active = predicted_sets(make_bundle, 1, stored["texts"])
    candidate = predicted_sets(make_bundle, 2, stored["texts"])
    expected = expected_figures(stored["ids"], active, candidate, stored["gold"])
    check_report(body["report"], expected, size=12, reviewed=3)
    assert body["candidate_version"] == candidate_id and body["created_by"] == "api:root"
    first = stored["reviewed_order"][-1]
    assert stored["ids"][first] in expected["now_right"]  # corrected to exactly what the candidate says
    assert stored["ids"][stored["reviewed_order"][1]] in expected["now_wrong"]  # corrected back to the active's
    # The latest report is kept: GET returns it without recomputing, for any curator.
    latest = client.get(f"/api/v1/models/{candidate_id}/replay", headers=token(app, "cora", "curator"))
    assert latest.status_code == 200 and latest.get_json() == body


def test_sample_takes_the_reviewed_first_then_the_newest(app: Flask, stored: dict) -> None:
    ids = stored["ids"]
    with app.app_context():
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG))
        picked = sample(taxonomy, 5)
        # Latest corrected first, then the newest of the others.
        reviewed = [ids[i] for i in stored["reviewed_order"]]
        others = [pid for pid in reversed(ids) if pid not in reviewed][:2]
        assert [item.prediction.id for item in picked] == reviewed + others
        assert [set(item.gold) for item in picked[:3]] == [stored["gold"][i] for i in stored["reviewed_order"]]
        assert [item.gold for item in picked[3:]] == [None, None]
        assert [item.prediction.id for item in sample(taxonomy, 2)] == reviewed[:2]


def test_sample_size_caps_the_replay(app: Flask, client: FlaskClient, make_bundle: BundleFactory, stored: dict) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    app.config["REPLAY_SAMPLE_SIZE"] = 4
    body = replayed(app, client, candidate_id, token(app, "root", "admin"))
    assert body["report"]["sample"] == {"size": 4, "reviewed": 3}


def test_active_side_is_scored_fresh_not_read_from_stored_results(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, stored: dict
) -> None:
    """The stored results came from seed 1; once seed 3 is active, the replay compares with seed 3."""
    candidate_id = import_version(app, make_bundle, 2)
    with app.app_context():
        activate(import_version(app, make_bundle, 3), actor="tests")
    body = replayed(app, client, candidate_id, token(app, "root", "admin"))
    active = predicted_sets(make_bundle, 3, stored["texts"])
    candidate = predicted_sets(make_bundle, 2, stored["texts"])
    check_report(
        body["report"],
        expected_figures(stored["ids"], active, candidate, stored["gold"]),
        size=12,
        reviewed=3,
    )


def test_admin_replays_from_the_models_page_and_sees_the_report(
    app: Flask, make_bundle: BundleFactory, stored: dict
) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    admin = signed_in(app, "ada", "admin")
    models_page = admin.get("/models").get_data(as_text=True)
    assert f'action="/models/{candidate_id}/replay"' in models_page
    assert admin.get(f"/models/{candidate_id}/replay").get_data(as_text=True).count("Not replayed yet") == 1
    response = admin.post(f"/models/{candidate_id}/replay")
    assert response.status_code == 302 and response.headers["Location"] == f"/models/{candidate_id}/replay"
    with app.app_context():
        report = db.session.scalar(select(ReplayReport))
    queued = admin.get(f"/models/{candidate_id}/replay").get_data(as_text=True)
    assert f"Replay #{report.id} of {candidate_id}" in queued  # the flash: queued (or already running)
    wait_for_replay(app, report.id)
    page = admin.get(f"/models/{candidate_id}/replay").get_data(as_text=True)
    with app.app_context():
        report = db.session.get(ReplayReport, report.id)
        assert report.created_by == "ada" and report.sample_size == 12 and report.status == "finished"
    assert "data-poll-url" not in page and "Not replayed yet" not in page
    assert f"<dt>Predictions changed</dt><dd>{report.report['changed']}</dd>" in page
    assert f'action="/models/{candidate_id}/activate"' in page
    assert f"/predictions/{report.report['changes'][0]['id']}" in page


def test_training_run_page_offers_replay_of_its_candidate(
    app: Flask, admin_client: FlaskClient, make_bundle: BundleFactory
) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    with app.app_context():
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG))
        run = TrainingRun(taxonomy=taxonomy, status="finished", candidate_version=candidate_id)
        db.session.add(run)
        db.session.commit()
        run_id = run.id
    page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    assert f'action="/models/{candidate_id}/replay"' in page


def test_no_stored_predictions_is_an_empty_report(app: Flask, client: FlaskClient, make_bundle: BundleFactory) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    report = replayed(app, client, candidate_id, token(app, "root", "admin"))["report"]
    assert report["sample"] == {"size": 0, "reviewed": 0} and report["changed"] == 0 and report["per_label"] == []
    assert report["reviewed"]["active_micro_f1"] is None
    page = signed_in(app, "ada", "admin").get(f"/models/{candidate_id}/replay").get_data(as_text=True)
    assert "nothing to replay" in page


def test_bad_requests_are_clear_json_errors_and_store_nothing(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, stored: dict
) -> None:
    admin = token(app, "root", "admin")
    with app.app_context():
        active_id = db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == SLUG))
    unknown = client.post("/api/v1/models/test-tasks-nope/replay", headers=admin)
    assert unknown.status_code == 404 and "test-tasks-nope" in unknown.get_json()["error"]
    itself = client.post(f"/api/v1/models/{active_id}/replay", headers=admin)
    assert itself.status_code == 409 and "is the active" in itself.get_json()["error"]
    candidate_id = import_version(app, make_bundle, 2)
    not_yet = client.get(f"/api/v1/models/{candidate_id}/replay", headers=admin)
    assert not_yet.status_code == 404 and "not been replayed yet" in not_yet.get_json()["error"]
    assert client.get("/api/v1/models/test-tasks-nope/replay", headers=admin).status_code == 404
    anonymous = client.post(f"/api/v1/models/{candidate_id}/replay")
    assert anonymous.status_code == 401 and "token" in anonymous.get_json()["error"]
    curator = client.post(f"/api/v1/models/{candidate_id}/replay", headers=token(app, "cora", "curator"))
    assert curator.status_code == 403 and "admin" in curator.get_json()["error"]
    assert replay_count(app) == 0


def test_a_candidate_that_cannot_load_is_refused_by_name(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, stored: dict
) -> None:
    candidate_id = import_version(app, make_bundle, 5)
    with app.app_context():  # the stored artifact no longer matches its address (never loaded, so not cached)
        version = db.session.get(ModelVersion, candidate_id)
        db.session.get(ModelArtifact, version.artifact_sha256).data = b"not a bundle"
        db.session.commit()
    headers = token(app, "root", "admin")
    response = client.post(f"/api/v1/models/{candidate_id}/replay", headers=headers)
    assert response.status_code == 202
    assert wait_for_replay(app, response.get_json()["id"]) == "failed"
    failed = client.get(response.get_json()["status_url"], headers=headers).get_json()
    assert candidate_id in failed["error"] and "cannot be loaded" in failed["error"] and "report" not in failed
    admin = signed_in(app, "ada", "admin")
    page = admin.get(f"/models/{candidate_id}/replay").get_data(as_text=True)
    assert "The replay failed" in page and "does not match its sha256" in page
    assert client.get(f"/api/v1/models/{candidate_id}/replay", headers=headers).status_code == 404  # no report
    assert replay_count(app) == 1


def test_replay_pages_are_for_admins(app: Flask, client: FlaskClient, make_bundle: BundleFactory) -> None:
    candidate_id = import_version(app, make_bundle, 2)
    curator = signed_in(app, "cora", "curator")
    assert curator.post(f"/models/{candidate_id}/replay").status_code == 403
    assert curator.get(f"/models/{candidate_id}/replay").status_code == 403
    assert f'action="/models/{candidate_id}/replay"' not in curator.get("/models").get_data(as_text=True)
    anonymous = client.post(f"/models/{candidate_id}/replay")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    admin = signed_in(app, "ada", "admin")
    assert admin.get("/models/test-tasks-nope/replay").status_code == 404
    with app.app_context():
        active_id = db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == SLUG))
    page = admin.post(f"/models/{active_id}/replay", follow_redirects=True).get_data(as_text=True)
    assert "Nothing replayed" in page and "is the active" in page
    assert replay_count(app) == 0
