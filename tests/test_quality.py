"""Live quality from corrections on the real app: predictions through the predict API with a real tiny ONNX
bundle, corrections through the annotation API, then counts, precision/recall, flags, the timeline, the SVG
charts and the page, and bad input."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, signed_in
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import AnnotationEvent, utcnow
from webapp.quality.live import COLORS
from webapp.serving.registry import activate, import_bundle

SLUG = "test-tasks"
SVG = "{http://www.w3.org/2000/svg}"
OFFLINE = {
    "test": {
        "micro_f1": 0.8,
        "micro_precision": 0.75,
        "micro_recall": 0.85,
        "macro_f1": 0.5,
        "per_label": {label: {"f1": 0.9, "precision": 0.9, "recall": 0.9, "support": 10} for label in LABELS},
    }
}


@pytest.fixture
def app(empty_app: Flask, make_bundle: BundleFactory) -> Flask:
    """The active version carries trainer-shaped per-label test metrics; small evidence limits fit 12 papers."""
    empty_app.config.update(QUALITY_MIN_EVIDENCE=3, QUALITY_DROP_MARGIN=0.15)
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1, metrics=OFFLINE), actor="tests")
    return empty_app


def api_token(app: Flask, name: str, role: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def predict(client: FlaskClient, abstracts: list[dict]) -> list[dict]:
    """``{"id", "labels", "scores"}`` of each new prediction, from the predict API."""
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200, response.get_json()
    return [{"id": p["id"], **p["results"][SLUG]} for p in response.get_json()["predictions"]]


def correct(
    client: FlaskClient, headers: dict[str, str], prediction_id: int, labels: set[str], note: str = "", slug: str = SLUG
) -> None:
    body = {"taxonomy": slug, "labels": sorted(labels), "note": note}
    response = client.post(f"/api/v1/predictions/{prediction_id}/annotations", json=body, headers=headers)
    assert response.status_code in (200, 201), response.get_json()


def quality(client: FlaskClient, query: str = "") -> dict:
    response = client.get(f"/api/v1/taxonomies/{SLUG}/quality{query}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_counts_and_live_precision_recall_come_from_the_corrections(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    curator = api_token(app, "cora", "curator")
    predictions = predict(client, abstracts[:12])
    gold: dict[int, set[str]] = {}
    for i, p in enumerate(predictions[:10]):
        labels = set(p["labels"])
        if i % 2 == 0 and labels:
            labels.remove(sorted(labels)[0])  # a false positive
        if i % 3 == 0:
            labels.add(next(label for label in LABELS if label not in p["labels"]))  # a false negative
        gold[p["id"]] = labels
        correct(client, curator, p["id"], labels, note="checked")  # note only where nothing changed: still reviewed
    expected = {label: {"tp": 0, "fp": 0, "fn": 0} for label in LABELS}
    for p in predictions[:10]:
        predicted, truth = set(p["labels"]), gold[p["id"]]
        for label in predicted & truth:
            expected[label]["tp"] += 1
        for label in predicted - truth:
            expected[label]["fp"] += 1
        for label in truth - predicted:
            expected[label]["fn"] += 1

    body = quality(client)
    assert body["reviewed"] == 10, "the two predictions nobody corrected must not count"
    assert body["active"] is True and body["offline_version"] == body["version"]
    assert body["reviewed_per_version"] == {body["version"]: 10}
    rows = {row["label"]: row for row in body["labels"]}
    assert set(rows) == {label for label, c in expected.items() if sum(c.values())}
    for label, row in rows.items():
        tp, fp, fn = (expected[label][k] for k in ("tp", "fp", "fn"))
        assert (row["tp"], row["fp"], row["fn"], row["reviewed"]) == (tp, fp, fn, tp + fp + fn), label
        assert row["precision"] == (round(tp / (tp + fp), 4) if tp + fp else None)
        assert row["recall"] == (round(tp / (tp + fn), 4) if tp + fn else None)
        assert row["f1"] == round(2 * tp / (2 * tp + fp + fn), 4)
        assert row["offline_f1"] == 0.9
    tp, fp, fn = (sum(c[k] for c in expected.values()) for k in ("tp", "fp", "fn"))
    micro = body["micro"]
    assert (micro["tp"], micro["fp"], micro["fn"]) == (tp, fp, fn)
    assert micro["precision"] == round(tp / (tp + fp), 4) and micro["recall"] == round(tp / (tp + fn), 4)
    assert (micro["offline_f1"], micro["offline_precision"], micro["offline_recall"]) == (0.8, 0.75, 0.85)
    assert body["timeline"]["period"] == "day" and len(body["timeline"]["points"]) == 1
    assert body["timeline"]["points"][0] == {"start": utcnow().date().isoformat(), "fp": fp, "fn": fn}


def test_labels_whose_live_f1_dropped_are_flagged(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    curator = api_token(app, "cora", "curator")
    predictions = predict(client, abstracts[:12])
    counts = {label: sum(label in p["labels"] for p in predictions) for label in LABELS}
    dropped = max(LABELS, key=lambda label: counts[label])
    rare = min((label for label in LABELS if 0 < counts[label] < counts[dropped]), key=lambda label: counts[label])
    app.config["QUALITY_MIN_EVIDENCE"] = counts[dropped]  # enough for the dropped label, too much for the rare one
    for p in predictions:
        correct(client, curator, p["id"], set(p["labels"]) - {dropped, rare}, note="checked")

    rows = {row["label"]: row for row in quality(client)["labels"]}
    assert rows[dropped]["f1"] == 0.0 and rows[dropped]["flagged"] is True
    assert rows[rare]["f1"] == 0.0 and rows[rare]["flagged"] is False, "fewer reviews than QUALITY_MIN_EVIDENCE"
    kept = [row for label, row in rows.items() if label not in (dropped, rare)]
    assert kept and all(row["f1"] == 1.0 and not row["flagged"] for row in kept)
    assert quality(client)["labels"][0]["label"] == dropped, "flagged labels are listed first"
    assert quality(client)["flag_rule"] == {"min_evidence": counts[dropped], "drop_margin": 0.15}

    page = client.get(f"/models/{SLUG}/quality").get_data(as_text=True)
    assert "dropped" in page and f"{dropped}: 0.000 live vs 0.900" in page


def test_no_offline_figures_means_no_flag(empty_app: Flask, make_bundle: BundleFactory, abstracts: list[dict]) -> None:
    """The tiny default bundle has no per-label test figures: live quality is shown, nothing is flagged."""
    empty_app.config["QUALITY_MIN_EVIDENCE"] = 1
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    client = empty_app.test_client()
    curator = api_token(empty_app, "cora", "curator")
    for p in predict(client, abstracts[:4]):
        correct(client, curator, p["id"], set(), note="none of these")
    body = quality(client)
    assert body["labels"] and all(row["offline_f1"] is None and not row["flagged"] for row in body["labels"])


def test_the_timeline_goes_weekly_over_a_long_span(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    curator = api_token(app, "cora", "curator")
    predictions = predict(client, abstracts[:6])
    for p in predictions:
        correct(client, curator, p["id"], set(LABELS) - set(p["labels"]))  # every label flipped
    with app.app_context():  # the same corrections, as if made over ten weeks
        events = db.session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id)).all()
        for weeks, event in zip((10, 10, 4, 1, 0, 0), events, strict=True):
            event.created_at -= timedelta(weeks=weeks)
        db.session.commit()
    body = quality(client)
    points = body["timeline"]["points"]
    assert body["timeline"]["period"] == "week"
    assert 10 <= len(points) <= 11, "every week from the first to the last correction, empty ones included"
    assert [p["start"] for p in points] == sorted(p["start"] for p in points)
    assert sum(p["fp"] for p in points) == body["micro"]["fp"] > 0
    assert sum(p["fn"] for p in points) == body["micro"]["fn"] > 0
    assert sum(1 for p in points if p["fp"] or p["fn"]) == 4


def parse_svg(client: FlaskClient, chart: str, query: str = "") -> ET.Element:
    response = client.get(f"/models/{SLUG}/quality/{chart}.svg{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/svg+xml"
    assert "Content-Security-Policy" in response.headers
    root = ET.fromstring(response.get_data())  # well-formed XML or this raises
    assert root.tag == f"{SVG}svg" and root.find(f"{SVG}title") is not None
    return root


def test_charts_are_well_formed_svg(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    empty = parse_svg(client, "timeline")
    assert "no reviewed predictions yet" in "".join(empty.itertext())
    curator = api_token(app, "cora", "curator")
    predictions = predict(client, abstracts[:5])
    for p in predictions:
        correct(client, curator, p["id"], set(LABELS[:2]), note="checked")
    body = quality(client)

    timeline = parse_svg(client, "timeline")
    bars = [r for r in timeline.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 2 * len(body["timeline"]["points"])
    fp_bar = next(r for r in bars if r.get("fill") == COLORS["fp"])
    assert f"{body['micro']['fp']} false positives" in fp_bar.find(f"{SVG}title").text
    assert all(float(r.get("height")) >= 0 for r in bars)

    labels = parse_svg(client, "labels")
    names = [t.text for t in labels.iter(f"{SVG}text")]
    for row in body["labels"]:
        assert any(row["label"] in (name or "") for name in names), row["label"]
    paired = [r for r in labels.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(paired) == 2 * len(body["labels"]), "a live and an offline bar per label"
    assert {r.get("fill") for r in paired} == {COLORS["live"], COLORS["offline"]}


def test_the_page_is_linked_from_the_models_page_and_learning_is_for_admins(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    assert f'href="/models/{SLUG}/quality"' in client.get("/models").get_data(as_text=True)
    page = client.get(f"/models/{SLUG}/quality")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert f"/models/{SLUG}/quality/timeline.svg" in html and f"/models/{SLUG}/quality/labels.svg" in html
    assert "No reviewed predictions of this version yet" in html
    assert "Learn thresholds from reviews" not in html
    assert "Learn thresholds from reviews" not in signed_in(app, "cora", "curator").get(f"/models/{SLUG}/quality").text
    assert "Learn thresholds from reviews" in signed_in(app, "ada", "admin").get(f"/models/{SLUG}/quality").text


def test_older_versions_keep_their_own_figures(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    curator = api_token(app, "cora", "curator")
    first = quality(client)["version"]
    for p in predict(client, abstracts[:3]):
        correct(client, curator, p["id"], set(), note="none of these")
    with app.app_context():
        second = import_bundle(make_bundle(seed=2, metrics=OFFLINE), actor="tests").version.id
        activate(second)
    body = quality(client)
    assert body["version"] == second and body["reviewed"] == 0 and body["micro"]["f1"] is None
    assert body["reviewed_per_version"] == {first: 3}
    older = quality(client, f"?version={first}")
    assert older["version"] == first and older["active"] is False and older["reviewed"] == 3
    assert f"?version={first}" in client.get(f"/models/{SLUG}/quality").get_data(as_text=True)
    parse_svg(client, "labels", f"?version={first}")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/taxonomies/nope/quality",
        f"/api/v1/taxonomies/{SLUG}/quality?version=no-such-version",
        "/models/nope/quality",
        f"/models/{SLUG}/quality?version=no-such-version",
        "/models/nope/quality/timeline.svg",
        f"/models/{SLUG}/quality/pie.svg",
    ],
)
def test_unknown_taxonomies_versions_and_charts_are_404(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    if path.startswith("/api/"):
        assert "error" in response.get_json()


def test_a_version_of_another_taxonomy_is_404(app: Flask, client: FlaskClient, make_bundle: BundleFactory) -> None:
    with app.app_context():
        other = import_bundle(make_bundle(seed=3, slug="other-tasks", name="Other"), actor="tests").version.id
    response = client.get(f"/api/v1/taxonomies/{SLUG}/quality?version={other}")
    assert response.status_code == 404 and "is not a version of test-tasks" in response.get_json()["error"]
