"""Similar past abstracts: embeddings stored on every path (int8 directions within quantisation of the model's),
neighbours equal to a brute-force cosine over the stored embeddings and close to the model's own, only the same model
version, the prediction itself and copies of its text left out, the reviewed labels shown, and ``k`` checked."""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, live_models_of
from tests.test_batch import make_csv, paper_rows, upload, wait_for
from webapp.extensions import db
from webapp.models import PredictionResult
from webapp.serving.bundle import compose_text
from webapp.serving.registry import activate, import_bundle
from webapp.serving.stored import unpack_embedding

SLUG = "test-tasks"


def predict(client: FlaskClient, papers: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": p["title"], "abstract": p["abstract"]} for p in papers]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [p["id"] for p in response.get_json()["predictions"]]


def similar(client: FlaskClient, prediction_id: int, k: int = 5) -> list[dict]:
    response = client.get(f"/api/v1/predictions/{prediction_id}/similar?k={k}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["results"][SLUG]["similar"]


def test_embeddings_are_stored_for_web_api_and_batch_predictions(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    client.post("/", data={"title": abstracts[0]["title"], "abstract": abstracts[0]["abstract"]})
    predict(client, abstracts[1:2])
    assert upload(curator_client, make_csv(paper_rows(abstracts[2:], n=2))).status_code == 302
    assert wait_for(curator_client, 1)["status"] == "finished"
    with app.app_context():
        model = live_models_of(app).current()[SLUG].model
        rows = db.session.scalars(select(PredictionResult).order_by(PredictionResult.id)).all()
        assert [r.prediction.source for r in rows] == ["web", "api", "batch", "batch"]
        for row, paper in zip(rows, abstracts, strict=False):
            expected = model.score([compose_text(paper["title"], paper["abstract"])])[0].embedding
            # int8 keeps the direction to within half a step of 1/127 of the largest component
            assert direction(row.embedding.vector) == pytest.approx(expected / np.linalg.norm(expected), abs=0.01)


def direction(blob: bytes) -> np.ndarray:
    vector = unpack_embedding(blob)
    return vector / np.linalg.norm(vector)


def test_neighbours_match_a_brute_force_cosine(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    papers = abstracts[:12]
    ids = predict(client, papers)
    with app.app_context():
        model = live_models_of(app).current()[SLUG].model
        exact = np.stack([model.score([compose_text(p["title"], p["abstract"])])[0].embedding for p in papers])
        rows = db.session.scalars(select(PredictionResult).order_by(PredictionResult.prediction_id)).all()
        vectors = np.stack([direction(row.embedding.vector) for row in rows])
    exact = exact / np.linalg.norm(exact, axis=1, keepdims=True)
    for i in (0, 5):
        cosine = vectors @ vectors[i]
        expected = [j for j in np.argsort(-cosine, kind="stable") if j != i][:5]
        found = similar(client, ids[i])
        assert [row["id"] for row in found] == [ids[j] for j in expected]
        assert [row["similarity"] for row in found] == pytest.approx([float(cosine[j]) for j in expected], abs=1e-5)
        # and within the int8 quantisation of the model's own float32 cosine
        assert [row["similarity"] for row in found] == pytest.approx(
            [float(exact[j] @ exact[i]) for j in expected], abs=0.01
        )
        assert found[0]["title"] == papers[expected[0]]["title"] and found[0]["reviewed"] is False
    # Rows stored after the first query join the index.
    (newer,) = predict(client, [{"title": "Copy", "abstract": papers[0]["abstract"] + " Extra words here."}])
    assert newer in [row["id"] for row in similar(client, ids[0], k=50)]


def test_the_prediction_itself_and_copies_of_its_text_are_left_out(client: FlaskClient, abstracts: list[dict]) -> None:
    first, copy, other, twin_a, twin_b = predict(
        client, [abstracts[0], abstracts[0], *abstracts[1:2], *abstracts[2:3] * 2]
    )
    found = [row["id"] for row in similar(client, first, k=50)]
    assert first not in found and copy not in found and other in found
    # Copies among the neighbours count once.
    assert len({twin_a, twin_b} & set(found)) == 1 and len(found) == 2


def test_only_results_of_the_same_model_version_are_compared(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    old = predict(client, abstracts[:4])
    with app.app_context():
        newer = import_bundle(make_bundle(seed=2)).version.id
        activate(newer)
    live_models_of(app).refresh()
    new = predict(client, abstracts[4:8])
    assert {row["id"] for row in similar(client, old[0], k=50)} == set(old[1:])
    assert {row["id"] for row in similar(client, new[0], k=50)} == set(new[1:])
    body = client.get(f"/api/v1/predictions/{new[0]}/similar").get_json()
    assert body["results"][SLUG]["model_version"] == newer


def test_reviewed_neighbours_show_their_current_labels(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, abstracts: list[dict]
) -> None:
    ids = predict(client, abstracts[:3])
    with app.app_context():
        predicted = db.session.scalar(select(PredictionResult.labels).where(PredictionResult.prediction_id == ids[1]))
    corrected = ["Code Generation", "Speech Recognition"]
    saved = curator_client.post(
        f"/curate/predictions/{ids[1]}/{SLUG}", data={"based_on": "0", "labels": corrected, "add": [""], "note": ""}
    )
    assert saved.status_code == 302, saved.get_data(as_text=True)
    rows = {row["id"]: row for row in similar(client, ids[0])}
    assert rows[ids[1]]["reviewed"] is True and rows[ids[1]]["labels"] == corrected != sorted(predicted)
    assert rows[ids[2]]["reviewed"] is False
    page = client.get(f"/predictions/{ids[0]}").get_data(as_text=True)
    section = page[page.index("Similar past abstracts") :]
    assert f'href="/predictions/{ids[1]}"' in section and '<span class="badge ok">reviewed</span>' in section
    assert all(f'<li class="chip">{label}</li>' in section for label in corrected)


@pytest.mark.parametrize("k", ["0", "51", "-1", "abc", "", "1.5", "9999999999"])
def test_bad_k_is_a_400(client: FlaskClient, abstracts: list[dict], k: str) -> None:
    (prediction_id,) = predict(client, abstracts[:1])
    response = client.get(f"/api/v1/predictions/{prediction_id}/similar?k={k}")
    assert response.status_code == 400 and "k must be a whole number from 1 to 50" in response.get_json()["error"]


def test_unknown_prediction_is_a_404(client: FlaskClient) -> None:
    response = client.get("/api/v1/predictions/999/similar")
    assert response.status_code == 404 and "no prediction 999" in response.get_json()["error"]


def test_page_says_when_nothing_is_similar_yet(client: FlaskClient, abstracts: list[dict]) -> None:
    (prediction_id,) = predict(client, abstracts[:1])
    page = client.get(f"/predictions/{prediction_id}").get_data(as_text=True)
    assert "Similar past abstracts" in page and "No other abstract has been tagged by this model version yet" in page
