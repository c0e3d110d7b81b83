"""Compact storage (issue 13 point 1, ``webapp/serving/stored.py``): every 6-decimal score reads back exactly, rows
that do not fit the version's layout keep their numbers as given, embeddings keep their direction; migration 0012
converts a database of the previous schema (results, embeddings, corrections) with the API answering as before,
and its downgrade restores the previous form."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import flask_migrate
import numpy as np
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BundleFactory, live_models_of, make_app
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import ApiToken, ModelVersion, PredictionResult, User
from webapp.serving.bundle import compose_text
from webapp.serving.registry import import_bundle
from webapp.serving.stored import Layout, pack_embedding, pack_scores, rounded, unpack_embedding, unpack_scores

# --- the byte formats ----------------------------------------------------------------------------------------------


def test_every_six_decimal_score_reads_back_exactly() -> None:
    """All 1,000,001 values the API can answer in [0, 1] come back as the very float ``round(x, 6)`` gave."""
    values = np.arange(1_000_001) / 1e6
    back = unpack_scores(pack_scores(values))
    assert back.dtype == np.float64 and np.array_equal(back.view(np.int64), values.view(np.int64))
    assert all(float(v) == round(float(v), 6) for v in values[::9973])


def test_rounding_equals_python_round_of_float32_probabilities() -> None:
    """What the scorer stores for a float32 probability is what ``round(float(p), 6)`` stored before."""
    rng = np.random.default_rng(0)
    probabilities = np.concatenate(
        [
            rng.random(200_000, dtype=np.float32),
            rng.random(20_000).astype(np.float32) ** 8,  # tiny scores, as most labels get
            np.asarray([0.0, 1.0, 0.0078125, 0.5, 5e-7, 1.5e-6, 0.9999995], dtype=np.float32),  # ties
        ]
    )
    assert rounded(probabilities).tolist() == [round(float(p), 6) for p in probabilities]


def test_scores_take_one_to_three_bytes_each() -> None:
    assert len(pack_scores([0.0, 0.000127])) == 2
    assert len(pack_scores([0.000128, 0.016383])) == 4
    assert len(pack_scores([0.016384, 1.0])) == 6


@pytest.mark.parametrize("blob", [b"\x80", b"\x81\x82\x83\x04", b"\x01\x80"])
def test_unreadable_score_bytes_are_refused(blob: bytes) -> None:
    with pytest.raises(ValueError, match="varints"):
        unpack_scores(blob)


LAYOUT = Layout.of(["a", "b", "c"], [0.5, 0.3, 0.35])


def test_a_layout_stores_thresholds_as_the_scorer_rounds_them() -> None:
    assert list(LAYOUT.thresholds.items()) == [("a", 0.5), ("b", 0.3), ("c", 0.35)]


def test_scores_that_fit_the_layout_are_packed_and_read_back_in_its_order() -> None:
    scores = {"a": 0.000001, "b": 0.999999, "c": 0.123456}
    packed = LAYOUT.pack(scores, dict(LAYOUT.thresholds))
    assert packed.scores_by_label is None and packed.thresholds_by_label is None
    assert list(LAYOUT.scores(packed.score_values).items()) == list(scores.items())


@pytest.mark.parametrize(
    "scores",
    [
        {"b": 0.2, "a": 0.1, "c": 0.3},  # another order: an export would list them differently
        {"a": 0.1, "b": 0.2},  # not every label
        {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},  # a label the version lacks
        {"a": 0.1234567, "b": 0.2, "c": 0.3},  # more than 6 decimals (out-of-fold scores from the trainer)
        {"a": 1, "b": 0.2, "c": 0.3},  # an int reads back as an int
        {"a": 1.5, "b": 0.2, "c": 0.3},  # not a probability
        {"a": -0.0, "b": 0.2, "c": 0.3},
    ],
)
def test_scores_that_do_not_fit_are_kept_as_given(scores: dict) -> None:
    packed = LAYOUT.pack(scores, dict(LAYOUT.thresholds))
    assert packed.score_values is None and packed.scores_by_label == scores
    assert json.dumps(packed.scores_by_label) == json.dumps(scores)


@pytest.mark.parametrize(
    "thresholds", [{"a": 0.5, "b": 0.3, "c": 0.4}, {"c": 0.35, "a": 0.5, "b": 0.3}, {"a": 0.5, "b": 0.3}, {"a": 0.2}]
)
def test_thresholds_unlike_the_versions_are_kept_with_the_row(thresholds: dict) -> None:
    packed = LAYOUT.pack({"a": 0.1, "b": 0.2, "c": 0.3}, thresholds)
    assert packed.score_values is not None and packed.thresholds_by_label == thresholds


def test_an_embedding_keeps_its_direction_in_one_byte_a_dimension() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        vector = rng.normal(size=384).astype(np.float32)
        vector /= np.linalg.norm(vector)
        blob = pack_embedding(vector)
        back = unpack_embedding(blob)
        assert len(blob) == 384 and np.abs(back).max() == 127
        assert float(back @ vector) / float(np.linalg.norm(back)) > 0.9999
    assert not unpack_embedding(pack_embedding(np.zeros(8))).any()


# --- what the app stores ---------------------------------------------------------------------------------------------


def test_new_predictions_answer_the_scores_the_model_gave_to_6_decimals(app: Flask, client: FlaskClient) -> None:
    paper = {"title": "Stored compactly", "abstract": "We study image classification with convolutional networks."}
    answer = client.post("/api/v1/predict", json=paper).get_json()["predictions"][0]
    with app.app_context():
        model = live_models_of(app).current()["test-tasks"].model
        probabilities = model.score([compose_text(paper["title"], paper["abstract"])])[0].probabilities
        expected = {label: round(float(p), 6) for label, p in zip(model.labels, probabilities, strict=True)}
        assert answer["results"]["test-tasks"]["scores"] == expected
        db.session.expunge_all()  # read back from the database, not the objects just stored
        result = db.session.scalars(sa.select(PredictionResult)).one()
        assert result.scores == expected and list(result.scores) == LABELS
        assert result.thresholds == dict.fromkeys(LABELS, 0.5)
        assert result.scores_by_label is None and result.thresholds_by_label is None
        assert result.score_values == pack_scores(list(expected.values()))


# --- migration 0012 ---------------------------------------------------------------------------------------------------

BEFORE = "0011_current_labels"
OTHER = "other-tasks"
OTHER_LABELS = ["Alpha", "Beta", "Gamma"]
META = sa.MetaData()
OLD_RESULTS = sa.Table(
    "prediction_results",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prediction_id", sa.Integer),
    sa.Column("taxonomy_id", sa.Integer),
    sa.Column("model_version_id", sa.String),
    sa.Column("scores", sa.JSON),
    sa.Column("labels", sa.JSON),
    sa.Column("thresholds", sa.JSON),
    sa.Column("margin", sa.Float),
    sa.Column("embedding", sa.LargeBinary),
)
PREDICTIONS = sa.Table(
    "predictions",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("title", sa.Text),
    sa.Column("abstract", sa.Text),
    sa.Column("text_sha256", sa.String),
    sa.Column("source", sa.String),
    sa.Column("created_at", sa.DateTime),
)
LABEL_ROWS = {
    name: sa.Table(
        name,
        META,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("result_id", sa.Integer),
        sa.Column("prediction_id", sa.Integer),
        sa.Column("label", sa.String),
    )
    for name in ("predicted_labels", "current_labels")
}
EVENTS = sa.Table(
    "annotation_events",
    META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prediction_id", sa.Integer),
    sa.Column("taxonomy_id", sa.Integer),
    sa.Column("user_id", sa.Integer),
    sa.Column("created_at", sa.DateTime),
    sa.Column("added", sa.JSON),
    sa.Column("removed", sa.JSON),
    sa.Column("note", sa.Text),
    sa.Column("kind", sa.String),
    sa.Column("undoes_id", sa.Integer),
)


def _unit_vector(rng: np.random.Generator) -> bytes:
    vector = rng.normal(size=32).astype("<f4")
    return (vector / np.linalg.norm(vector)).astype("<f4").tobytes()


def _insert(connection: sa.Connection, table: sa.Table, **values: object) -> int:
    return connection.execute(sa.insert(table).values(**values).returning(table.c.id)).scalar_one()


def _old_database(app: Flask, versions: dict[str, str], taxonomy_ids: dict[str, int]) -> dict[int, dict]:
    """Results as the release before 0012 stored them, written with SQL: result id -> what it holds."""
    rng = np.random.default_rng(7)
    stored: dict[int, dict] = {}
    with app.app_context(), db.engine.begin() as connection:
        user_id = _insert(
            connection, User.__table__, name="cora", role="curator", active=True, created_at=datetime.now()
        )

        def result(prediction_id: int, slug: str, scores: dict, thresholds: dict, embedding: bytes | None) -> int:
            labels = sorted((label for label, s in scores.items() if s >= 0.5), key=lambda label: -scores[label])
            result_id = _insert(
                connection,
                OLD_RESULTS,
                prediction_id=prediction_id,
                taxonomy_id=taxonomy_ids[slug],
                model_version_id=versions[slug],
                scores=scores,
                labels=labels,
                thresholds=thresholds,
                margin=0.1,
                embedding=embedding,
            )
            for label in labels:
                _insert(
                    connection,
                    LABEL_ROWS["predicted_labels"],
                    result_id=result_id,
                    prediction_id=prediction_id,
                    label=label,
                )
            stored[result_id] = {"prediction_id": prediction_id, "slug": slug, "scores": scores, "labels": labels}
            stored[result_id] |= {"thresholds": thresholds, "embedding": embedding}
            return result_id

        def six_decimals(labels: list[str]) -> dict:
            return {label: round(float(rng.random()) ** 3, 6) for label in labels}

        predictions = []
        for i in range(6):
            predictions.append(
                _insert(
                    connection,
                    PREDICTIONS,
                    title=f"Paper {i}",
                    abstract=f"Abstract number {i} about several things.",
                    text_sha256=f"{i:064x}",
                    source="api" if i < 5 else "dataset",
                    created_at=datetime(2026, 11, 1, 12, i),
                )
            )
        # Two taxonomies on one encoder: the same embedding bytes in both results.
        for prediction_id in predictions[:4]:
            vector = _unit_vector(rng)
            result(prediction_id, "test-tasks", six_decimals(LABELS), dict.fromkeys(LABELS, 0.5), vector)
            result(prediction_id, OTHER, six_decimals(OTHER_LABELS), dict.fromkeys(OTHER_LABELS, 0.3), vector)
        # The extremes, and a result stored without an embedding.
        edges = dict(zip(LABELS, [0.0, 1.0, 0.000001, 0.999999, 0.5, 0.000127, 0.000128, 0.016384], strict=False))
        result(predictions[4], "test-tasks", edges, dict.fromkeys(LABELS, 0.5), None)
        # A base-data paper (label-issue import): out-of-fold scores over another label order with more decimals
        # and an int, one threshold for all of them.
        odd = {LABELS[2]: 0.12345678, LABELS[0]: 1, LABELS[1]: 0.25}
        result(predictions[5], "test-tasks", odd, dict.fromkeys(odd, 0.4), _unit_vector(rng))
        # A correction, and a correction undone, with the current labels 0011 kept for the corrected result.
        first = next(r for r, v in stored.items() if v["prediction_id"] == predictions[0] and v["slug"] == "test-tasks")
        at = datetime(2026, 11, 2)
        _insert(
            connection,
            EVENTS,
            prediction_id=predictions[0],
            taxonomy_id=taxonomy_ids["test-tasks"],
            user_id=user_id,
            created_at=at,
            added=[LABELS[7]],
            removed=[],
            note="add",
            kind="correction",
        )
        undone = _insert(
            connection,
            EVENTS,
            prediction_id=predictions[0],
            taxonomy_id=taxonomy_ids["test-tasks"],
            user_id=user_id,
            created_at=at,
            added=[],
            removed=[LABELS[7]],
            note="oops",
            kind="correction",
        )
        _insert(
            connection,
            EVENTS,
            prediction_id=predictions[0],
            taxonomy_id=taxonomy_ids["test-tasks"],
            user_id=user_id,
            created_at=at,
            added=[],
            removed=[],
            note="",
            kind="undo",
            undoes_id=undone,
        )
        current = sorted(set(stored[first]["labels"]) | {LABELS[7]})
        for label in current:
            _insert(
                connection, LABEL_ROWS["current_labels"], result_id=first, prediction_id=predictions[0], label=label
            )
        stored[first]["current"] = current
    return stored


def _snapshot(app: Flask) -> dict[str, list]:
    """Everything the conversion must leave alone: predictions, label rows and events, as rows."""
    with app.app_context(), db.engine.connect() as connection:
        tables = [PREDICTIONS, EVENTS, *LABEL_ROWS.values()]
        return {t.name: [tuple(row) for row in connection.execute(sa.select(t).order_by(t.c.id))] for t in tables}


def _check_old_form(app: Flask, stored: dict[int, dict]) -> None:
    """The previous form, as it was: scores and thresholds equal in order, value and type; embeddings in direction."""
    with app.app_context(), db.engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(sa.select(OLD_RESULTS))}
    assert set(rows) == set(stored)
    for result_id, was in stored.items():
        row = rows[result_id]
        assert json.dumps(row.scores) == json.dumps(was["scores"])
        assert json.dumps(row.thresholds) == json.dumps(was["thresholds"])
        assert row.labels == was["labels"]
        if was["embedding"] is None:
            assert row.embedding is None
        else:
            back, original = (np.frombuffer(b, dtype="<f4") for b in (row.embedding, was["embedding"]))
            assert len(back) == 32 and abs(float(np.linalg.norm(back)) - 1) < 1e-6
            assert back == pytest.approx(original, abs=0.01)


def _exports(client: FlaskClient, headers: dict[str, str]) -> tuple[str, str]:
    predictions = client.get("/api/v1/predictions.jsonl", headers=headers)
    annotations = client.get("/api/v1/annotations", headers=headers)
    assert predictions.status_code == annotations.status_code == 200
    return predictions.get_data(as_text=True), annotations.get_data(as_text=True)


def test_0012_converts_a_previous_database_and_back(tmp_path: Path, make_bundle: BundleFactory) -> None:
    app = make_app(tmp_path / "data")
    with app.app_context():
        versions = {
            "test-tasks": import_bundle(make_bundle(seed=1), actor="tests").version.id,
            OTHER: import_bundle(
                make_bundle(seed=2, slug=OTHER, name="Other", labels=OTHER_LABELS, threshold=0.3), actor="tests"
            ).version.id,
        }
        taxonomy_ids = {
            slug: db.session.scalar(sa.select(ModelVersion.taxonomy_id).where(ModelVersion.id == version))
            for slug, version in versions.items()
        }
        flask_migrate.downgrade(revision=BEFORE)
        db.session.remove()
    stored = _old_database(app, versions, taxonomy_ids)
    untouched = _snapshot(app)
    _check_old_form(app, stored)

    with app.app_context():
        flask_migrate.upgrade()
        db.session.remove()
        assert _snapshot(app) == untouched
        results = {r.id: r for r in db.session.scalars(sa.select(PredictionResult))}
        assert set(results) == set(stored)
        for result_id, was in stored.items():
            result = results[result_id]
            assert json.dumps(result.scores) == json.dumps(was["scores"])  # order, values and types
            assert json.dumps(result.thresholds) == json.dumps(was["thresholds"])
            assert result.labels == was["labels"]
            if was["embedding"] is None:
                assert result.embedding is None
            else:
                original = np.frombuffer(was["embedding"], dtype="<f4")
                back = unpack_embedding(result.embedding.vector)
                assert float(back @ original) / float(np.linalg.norm(back)) > 0.999
        # Fitting rows are packed and share the version's thresholds; the base-data paper keeps its own numbers.
        odd = [r for r in results.values() if r.scores_by_label is not None]
        assert [r.prediction.source for r in odd] == ["dataset"] and odd[0].thresholds_by_label is not None
        assert all(
            r.score_values is not None and r.thresholds_by_label is None for r in results.values() if r not in odd
        )
        # Every label row names its result's taxonomy (migration 0021), in both taxonomies.
        owners = db.session.execute(
            sa.text(
                "SELECT l.taxonomy_id, r.taxonomy_id FROM predicted_labels l "
                "JOIN prediction_results r ON r.id = l.result_id"
            )
        ).all()
        assert {mine for mine, _ in owners} == set(taxonomy_ids.values())
        assert all(mine == theirs for mine, theirs in owners)
        # One embedding row per prediction: its two taxonomies' results share it.
        embeddings = db.session.scalar(sa.text("SELECT count(*) FROM embeddings"))
        assert embeddings == len({v["prediction_id"] for v in stored.values() if v["embedding"] is not None}) == 5
        user = db.session.scalar(sa.select(User).where(User.name == "cora"))
        token, plain = ApiToken.issue(user, name="t")
        db.session.add(token)
        db.session.commit()

    headers = {"Authorization": f"Bearer {plain}"}
    client = app.test_client()
    predictions, annotations = _exports(client, headers)
    # The API answers what the previous release stored: every score and label, the corrections applied.
    records = {r["id"]: r for r in map(json.loads, predictions.splitlines())}
    for was in stored.values():
        answer = records[was["prediction_id"]]["results"][was["slug"]]
        assert json.dumps(answer["scores"]) == json.dumps(was["scores"])
        assert answer["predicted"] == sorted(was["labels"])
        assert sorted(answer["labels"]) == sorted(was.get("current", was["labels"]))
    (corrected,) = map(json.loads, annotations.splitlines())
    assert sorted(corrected["labels"]) == next(v["current"] for v in stored.values() if "current" in v)
    # Similar papers read the converted embeddings: the other papers of the version, nearest first.
    first = min(v["prediction_id"] for v in stored.values())
    answer = client.get(f"/api/v1/predictions/{first}/similar?k=10", headers=headers).get_json()
    similar = answer["results"]["test-tasks"]["similar"]
    vectors = {
        v["prediction_id"]: np.frombuffer(v["embedding"], "<f4")
        for v in stored.values()
        if v["slug"] == "test-tasks" and v["embedding"] is not None
    }
    assert {row["id"] for row in similar} == set(vectors) - {first}
    for row in similar:
        assert row["similarity"] == pytest.approx(float(vectors[row["id"]] @ vectors[first]), abs=0.01)

    with app.app_context():
        db.engine.dispose()
        flask_migrate.downgrade(revision=BEFORE)
        db.session.remove()
    assert _snapshot(app) == untouched
    _check_old_form(app, stored)
    with app.app_context():
        flask_migrate.upgrade()
        db.session.remove()
    assert _exports(app.test_client(), headers) == (predictions, annotations)
    with app.app_context():
        db.engine.dispose()
