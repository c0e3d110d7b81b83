"""Label surgery read through by the issue-6 views that compare a model's own label names with corrections: live
quality, replay and explanations see a renamed label under its new name, so a rename alone changes no figure."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BundleFactory
from tests.test_label_surgery import SLUG, change, most_predicted, results, token
from tests.test_replay import import_version, replayed


def confirm_all(client: FlaskClient, app: Flask, abstracts: list[dict]) -> str:
    """Twelve predictions, every one confirmed as the model said, then the most predicted label renamed. Returns the
    label's old name."""
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:12]]}
    predictions = client.post("/api/v1/predict", json=body).get_json()["predictions"]
    curator = token(app, "cora", "curator")
    for p in predictions:
        labels = p["results"][SLUG]["labels"]
        response = client.post(
            f"/api/v1/predictions/{p['id']}/annotations",
            json={"taxonomy": SLUG, "labels": labels, "note": "as predicted"},
            headers=curator,
        )
        assert response.status_code == 201, response.get_json()
    (old,) = most_predicted(app)
    response = change(client, token(app), kind="rename", **{"from": old, "to": "Renamed Task"})
    assert response.status_code == 201, response.get_json()
    return old


def test_quality_counts_a_renamed_label_under_its_new_name(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    old = confirm_all(client, app, abstracts)
    carrying = sum(old in labels for labels, _, _ in results(app).values())
    body = client.get(f"/api/v1/taxonomies/{SLUG}/quality").get_json()
    rows = {row["label"]: row for row in body["labels"]}
    assert old not in rows
    assert (rows["Renamed Task"]["tp"], rows["Renamed Task"]["fp"], rows["Renamed Task"]["fn"]) == (carrying, 0, 0)
    assert rows["Renamed Task"]["offline_f1"] is None  # no offline figure was measured under the new name
    assert body["micro"]["fp"] == body["micro"]["fn"] == 0


def test_replay_compares_in_todays_names(
    app: Flask, client: FlaskClient, abstracts: list[dict], make_bundle: BundleFactory
) -> None:
    old = confirm_all(client, app, abstracts)
    candidate = import_version(app, make_bundle, 2)
    report = replayed(app, client, candidate, token(app, "root", "admin"))["report"]
    assert old not in {row["label"] for row in report["per_label"]}
    assert report["reviewed"]["active_micro_f1"] == 1.0  # the active model, re-scored, says what was confirmed


def test_explanations_cover_a_renamed_label(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    old = confirm_all(client, app, abstracts)
    prediction_id = next(pid for pid, (labels, _, _) in results(app).items() if old in labels)
    answer = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()["explanations"][SLUG]
    explained = {entry["label"]: entry for entry in answer["labels"]}
    assert "Renamed Task" in explained and old not in explained
    assert explained["Renamed Task"]["predicted"] is True
