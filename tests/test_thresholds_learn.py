"""Thresholds that learn, on the real app: predictions through the predict API with a real tiny ONNX bundle,
corrections through the annotation API, then a learned version (same ONNX bytes, other thresholds) behind the
gate both ways, activation and the hot swap, the web flow and its roles, and bad input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

import trainer.thresholds
import webapp.quality.tuning
from tests.conftest import BundleFactory, live_models_of, signed_in
from tests.test_quality import SLUG, api_token, correct, predict, quality
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import ModelVersion, Taxonomy
from webapp.quality.learned_thresholds import fold_of
from webapp.serving.registry import import_bundle

URL = f"/api/v1/taxonomies/{SLUG}/thresholds"


@pytest.fixture
def app(empty_app: Flask, make_bundle: BundleFactory) -> Flask:
    empty_app.config.update(THRESHOLD_MIN_EVIDENCE=3)
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    return empty_app


@pytest.fixture
def admin(app: Flask) -> dict[str, str]:
    return api_token(app, "ops", "admin")


def active_version(app: Flask) -> str:
    with app.app_context():
        return db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == SLUG))


def version_count(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(ModelVersion))


def bundle_files(client: FlaskClient, headers: dict[str, str], version: str) -> dict[str, bytes]:
    response = client.get(f"/api/v1/models/{version}/bundle", headers=headers)
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.data), mode="r:gz") as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def review_with_a_lower_threshold(app: Flask, client: FlaskClient, abstracts: list[dict]) -> tuple[str, int]:
    """Curators add one label wherever the model scored it 0.3 or more: its best threshold is below 0.5.
    Returns that label and how many reviews have it."""
    predictions = predict(client, abstracts)
    scores = np.array([[p["scores"][label] for label in LABELS] for p in predictions])
    label = LABELS[int(np.argmax(((scores >= 0.3) & (scores < 0.5)).sum(axis=0)))]
    curator = api_token(app, "reviewer", "curator")
    positives = 0
    for p in predictions:
        gold = set(p["labels"]) | ({label} if p["scores"][label] >= 0.3 else set())
        positives += label in gold
        correct(client, curator, p["id"], gold, note="reviewed")
    return label, positives


def test_learned_thresholds_are_a_new_version_that_differs_only_in_thresholds(
    app: Flask, client: FlaskClient, admin: dict[str, str], abstracts: list[dict]
) -> None:
    parent = active_version(app)
    label, positives = review_with_a_lower_threshold(app, client, abstracts)
    response = client.post(URL, headers=admin)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["created"] is True and body["active"] is False and body["derived_from"] == parent
    assert body["version"] != parent and active_version(app) == parent, "learning must not activate anything"
    assert body["reviewed"] == len(abstracts) and body["min_evidence"] == 3 and body["folds"] == 2
    (changed,) = body["changed"]
    assert changed["label"] == label and changed["old"] == 0.5 and changed["new"] < 0.5
    assert changed["positives"] == positives
    gate = body["gate"]
    assert gate["passed"] is True and gate["reason"] == "passed" and gate["drift"] == 0.0
    assert body["held_out"]["learned_micro_f1"] >= body["held_out"]["trained_micro_f1"]
    assert gate["candidate_micro_f1"] == body["held_out"]["learned_micro_f1"]

    old, new = bundle_files(client, admin, parent), bundle_files(client, admin, body["version"])
    assert set(new) == set(old) == {"encoder.onnx", "head.onnx", "tokenizer.json", "bundle.json"}
    assert new["encoder.onnx"] == old["encoder.onnx"] and new["head.onnx"] == old["head.onnx"]
    assert new["tokenizer.json"] == old["tokenizer.json"]
    old_manifest, new_manifest = json.loads(old["bundle.json"]), json.loads(new["bundle.json"])
    assert new_manifest["labels"] == old_manifest["labels"]
    assert [
        (name, before, after)
        for name, before, after in zip(LABELS, old_manifest["thresholds"], new_manifest["thresholds"], strict=True)
        if before != after
    ] == [(label, 0.5, changed["new"])]
    assert new_manifest["metrics"]["learned_thresholds"]["derived_from"] == parent
    assert quality(client, f"?version={body['version']}")["offline_version"] == parent

    again = client.post(URL, headers=admin)
    assert again.status_code == 200 and again.get_json()["version"] == body["version"]
    assert again.get_json()["created"] is False, "the same reviews give the same bundle, hence the same version"

    activated = client.post(f"/api/v1/models/{body['version']}/activate", headers=admin)
    assert activated.status_code == 200 and active_version(app) == body["version"]
    live_models_of(app).refresh()  # what the watcher does within MODEL_POLL_SECONDS
    (after,) = predict(client, abstracts[:1])
    assert after["model_version"] == body["version"]
    assert (label in after["labels"]) == (after["scores"][label] >= changed["new"])


def test_the_gate_refuses_thresholds_that_do_not_hold_on_held_out_reviews(
    app: Flask, client: FlaskClient, admin: dict[str, str], abstracts: list[dict]
) -> None:
    """Curators of one fold want every label from 0.2 up, those of the other only from 0.8: thresholds tuned on
    either fold are worse on the other than the trained ones."""
    curator = api_token(app, "reviewer", "curator")
    for p in predict(client, abstracts):
        cut = 0.2 if fold_of(p["id"]) == 0 else 0.8
        correct(client, curator, p["id"], {label for label in LABELS if p["scores"][label] >= cut}, note="checked")
    response = client.post(URL, headers=admin)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["changed"], "the reviews should move some threshold"
    assert body["gate"]["passed"] is False
    assert body["held_out"]["learned_micro_f1"] < body["held_out"]["trained_micro_f1"]
    assert "is below the trained thresholds'" in body["gate"]["reason"]

    page = signed_in(app, "ada", "admin").get(f"/models/{SLUG}/thresholds/{body['version']}").get_data(as_text=True)
    assert "not passed" in page and "Not offered for activation" in page
    assert f"Activate {body['version']}" not in page
    assert active_version(app) == body["derived_from"]


def test_admins_learn_and_activate_from_the_pages_and_curators_cannot(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    parent = active_version(app)
    review_with_a_lower_threshold(app, client, abstracts)
    curator = signed_in(app, "cora", "curator")
    before = version_count(app)
    assert curator.post(f"/models/{SLUG}/thresholds").status_code == 403
    assert client.post(f"/models/{SLUG}/thresholds").status_code == 302, "anonymous: to the sign-in page"
    assert client.post(URL, headers=api_token(app, "bob", "curator")).status_code == 403
    assert client.post(URL).status_code == 401
    assert version_count(app) == before

    admin = signed_in(app, "ada", "admin")
    response = admin.post(f"/models/{SLUG}/thresholds", follow_redirects=True)
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "Learned new thresholds for 1 label" in html
    assert version_count(app) == before + 1
    with app.app_context():
        learned = db.session.scalar(select(ModelVersion.id).where(ModelVersion.id != parent))
    assert f"Activate {learned}" in html and "passed" in html
    assert f"Activate {learned}" not in client.get(f"/models/{SLUG}/thresholds/{learned}").get_data(as_text=True)
    assert curator.post(f"/models/{learned}/activate").status_code == 403
    assert active_version(app) == parent
    activated = admin.post(f"/models/{learned}/activate", data={"next": f"/models/{SLUG}/thresholds/{learned}"})
    assert activated.status_code == 302 and active_version(app) == learned
    assert 'class="badge ok">active' in admin.get(f"/models/{SLUG}/thresholds/{learned}").get_data(as_text=True)


def test_too_little_evidence_or_nothing_to_move_creates_nothing(
    app: Flask, client: FlaskClient, admin: dict[str, str], abstracts: list[dict]
) -> None:
    before = version_count(app)
    response = client.post(URL, headers=admin)
    assert response.status_code == 422
    assert "not enough evidence: a label needs 3 reviewed positives" in response.get_json()["error"]
    page = signed_in(app, "ada", "admin").post(f"/models/{SLUG}/thresholds", follow_redirects=True)
    assert page.status_code == 200 and "No thresholds learned: not enough evidence" in page.get_data(as_text=True)

    curator = api_token(app, "reviewer", "curator")
    for p in predict(client, abstracts):
        correct(client, curator, p["id"], set(p["labels"]), note="the model was right")
    response = client.post(URL, headers=admin)
    assert response.status_code == 422 and "the reviews move no threshold" in response.get_json()["error"]
    higher = client.post(URL, json={"min_evidence": 1000}, headers=admin)
    assert higher.status_code == 422 and "needs 1000 reviewed positives" in higher.get_json()["error"]
    assert version_count(app) == before


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"min_evidence": 0}}, 400, "min_evidence must be a whole number from 1"),
        ({"json": {"min_evidence": "3"}}, 400, "min_evidence must be a whole number from 1"),
        ({"json": {"min_evidence": True}}, 400, "min_evidence must be a whole number from 1"),
        ({"json": {"min_evidence": 2.5}}, 400, "min_evidence must be a whole number from 1"),
        ({"json": {"min_evdence": 3}}, 400, "unknown fields: min_evdence"),
        ({"json": [3]}, 400, "send an object"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "not valid JSON"),
        ({"data": "min_evidence=3", "content_type": "text/plain"}, 415, "Content-Type: application/json"),
    ],
)
def test_bad_bodies_are_400_and_create_nothing(
    app: Flask, client: FlaskClient, admin: dict[str, str], kwargs: dict, status: int, message: str
) -> None:
    before = version_count(app)
    response = client.post(URL, headers=admin, **kwargs)
    assert response.status_code == status and message in response.get_json()["error"]
    assert version_count(app) == before


def test_unknown_taxonomies_and_versions_are_404(app: Flask, client: FlaskClient, admin: dict[str, str]) -> None:
    assert client.post("/api/v1/taxonomies/nope/thresholds", headers=admin).status_code == 404
    assert signed_in(app, "ada", "admin").post("/models/nope/thresholds").status_code == 404
    assert client.get(f"/models/{SLUG}/thresholds/no-such-version").status_code == 404
    # A version that was not learned from reviews has no such page.
    assert client.get(f"/models/{SLUG}/thresholds/{active_version(app)}").status_code == 404


def test_the_trainer_tunes_with_the_same_function() -> None:
    assert trainer.thresholds.tune_thresholds is webapp.quality.tuning.tune_thresholds
