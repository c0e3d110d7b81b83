"""Explanations by occlusion: the sentence splitter, the drops against a direct computation with the model, one
batched onnxruntime run, the API's errors and the page's server-side explanation (``?explain=<slug>``)."""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, live_models_of
from webapp.evidence.explain import heat_class, split_sentences
from webapp.extensions import db
from webapp.models import PredictionResult, Taxonomy
from webapp.serving.bundle import compose_text
from webapp.serving.inference import LoadedModel
from webapp.serving.registry import activate, import_bundle

SLUG = "test-tasks"


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("We propose a model. It works well.", ["We propose a model.", "It works well."]),
        (
            "Methods, e.g. CNNs, help. We test i.e. Transformers too.",
            ["Methods, e.g. CNNs, help.", "We test i.e. Transformers too."],
        ),
        (
            "As Smith et al. (2019) showed, it holds. Next we test.",
            ["As Smith et al. (2019) showed, it holds.", "Next we test."],
        ),
        (
            "Accuracy rises from 0.5 to 0.93. Then 3.14 is shown.",
            ["Accuracy rises from 0.5 to 0.93.", "Then 3.14 is shown."],
        ),
        ("The U.S. Army uses it. We do too.", ["The U.S. Army uses it.", "We do too."]),
        ("We use approx. three layers (see Fig. 2). Done.", ["We use approx. three layers (see Fig. 2).", "Done."]),
        ("Does it work? Yes! It does.", ["Does it work?", "Yes!", "It does."]),
        ('We call it "fast." Then we go.', ['We call it "fast."', "Then we go."]),
        ("version 2. then lower case goes on", ["version 2. then lower case goes on"]),
        (
            "The cost is $O(n \\cdot m)$. We show $a. B$ holds \\cite{x}. \\emph{Then} we stop.",
            ["The cost is $O(n \\cdot m)$.", "We show $a. B$ holds \\cite{x}.", "\\emph{Then} we stop."],
        ),
        ("A first part without a stop\n\nA second part.", ["A first part without a stop", "A second part."]),
        ("  just a fragment without an end  ", ["just a fragment without an end"]),
        ("", []),
    ],
)
def test_sentence_splitter(text: str, sentences: list[str]) -> None:
    spans = split_sentences(text)
    assert [text[start:end] for start, end in spans] == sentences
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def model_of(app: Flask, slug: str = SLUG) -> LoadedModel:
    return live_models_of(app).current()[slug].model


def predict(client: FlaskClient, title: str | None, abstract: str) -> int:
    response = client.post("/api/v1/predict", json={"title": title, "abstract": abstract})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["predictions"][0]["id"]


def direct_drops(model: LoadedModel, title: str | None, sentences: list[str]) -> np.ndarray:
    """The drops computed the plain way: each variant text scored on its own with the model."""
    full = model.score([compose_text(title, " ".join(sentences))])[0].probabilities.astype(np.float64)
    variants = [compose_text(None, " ".join(sentences))] if title else []
    variants += [compose_text(title, " ".join(sentences[:i] + sentences[i + 1 :])) for i in range(len(sentences))]
    return np.array([full - model.score([v])[0].probabilities for v in variants])


def test_drops_equal_a_direct_computation_with_the_model(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    paper = abstracts[2]
    prediction_id = predict(client, paper["title"], paper["abstract"])
    response = client.get(f"/api/v1/predictions/{prediction_id}/explanation")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["errors"] == {}
    answer = body["explanations"][SLUG]
    with app.app_context():
        model = model_of(app)
        sentences = [paper["abstract"].strip()[s:e] for s, e in split_sentences(paper["abstract"].strip())]
        expected = direct_drops(model, paper["title"], sentences)
        full = model.score([compose_text(paper["title"], paper["abstract"])])[0].probabilities
        labels = model.labels
        stored_labels = db.session.scalar(
            select(PredictionResult.labels).where(PredictionResult.prediction_id == prediction_id)
        )
    assert answer["same_version"] is True and answer["model_version"] == answer["prediction_model_version"]
    explained = [entry["label"] for entry in answer["labels"]]
    # The predicted labels first, then the near misses the page shows (NEAR_MISSES = 4 of those at half their
    # threshold or more, NEAR_MISS_SHARE; the test bundle's thresholds are 0.5).
    near_misses = min(4, sum(1 for j, label in enumerate(labels) if label not in stored_labels and full[j] >= 0.25))
    assert explained[: len(stored_labels)] == stored_labels and len(explained) == len(stored_labels) + near_misses
    for entry in answer["labels"]:
        j = labels.index(entry["label"])
        assert entry["score"] == pytest.approx(float(full[j]), abs=1e-5)
        assert entry["predicted"] == (entry["label"] in stored_labels)
        units = entry["sentences"]
        assert [u["field"] for u in units] == ["title"] + ["abstract"] * len(sentences)
        assert units[0]["start"] == 0 and units[0]["end"] == len(paper["title"])
        assert [paper["abstract"].strip()[u["start"] : u["end"]] for u in units[1:]] == sentences
        assert [u["drop"] for u in units] == pytest.approx(list(expected[:, j]), abs=1e-5)
        # A sentence past the model's 128 tokens is not read: removing it changes nothing.
        for unit, drop in zip(units, expected[:, j], strict=True):
            if not unit["read"]:
                assert unit["drop"] == 0.0 and abs(drop) < 1e-6
    assert any(not u["read"] for u in answer["labels"][0]["sentences"]), "this long abstract runs past 128 tokens"


class CountingSession:
    """The real onnxruntime session, counting its runs and their batch sizes."""

    def __init__(self, session: object) -> None:
        self.session, self.batches = session, []

    def run(self, outputs: list[str], feeds: dict, *options: object) -> list:
        self.batches.append(len(feeds["input_ids"]))
        return self.session.run(outputs, feeds, *options)

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


def test_full_text_and_each_read_variant_are_scored_in_runs_of_their_own_that_bypass_the_cache(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    prediction_id = predict(client, abstracts[0]["title"], abstracts[0]["abstract"])
    with app.app_context():
        model = model_of(app)
    encoder = model.encoder
    cached = len(encoder._cache)
    real = encoder.session
    encoder.session = CountingSession(real)  # the encoder is shared per process: put the real session back after
    try:
        answer = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()["explanations"][SLUG]
        batches = encoder.session.batches
    finally:
        encoder.session = real
    read = sum(unit["read"] for unit in answer["labels"][0]["sentences"])
    # The test bundle reads one window per text: one run of one row per text, as every text is read.
    assert batches == [1] * (1 + read), "the full text and every read variant, each in a run of its own"
    assert len(encoder._cache) == cached, "variants must not evict real abstracts from the encoder's cache"


def test_one_sentence_abstract(app: Flask, client: FlaskClient) -> None:
    abstract = "We detect objects in aerial images with a small convolutional network"
    prediction_id = predict(client, None, abstract)
    answer = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()["explanations"][SLUG]
    with app.app_context():
        model = model_of(app)
        full = model.score([abstract])[0].probabilities
        empty = model.score([""])[0].probabilities
    for entry in answer["labels"]:
        (unit,) = entry["sentences"]
        assert (unit["field"], unit["start"], unit["end"], unit["read"]) == ("abstract", 0, len(abstract), True)
        j = model.labels.index(entry["label"])
        assert unit["drop"] == pytest.approx(float(full[j] - empty[j]), abs=1e-5)


def test_unknown_prediction_and_taxonomy_are_404_json(client: FlaskClient, abstracts: list[dict]) -> None:
    missing = client.get("/api/v1/predictions/999/explanation")
    assert missing.status_code == 404 and "no prediction 999" in missing.get_json()["error"]
    prediction_id = predict(client, None, abstracts[1]["abstract"])
    unknown = client.get(f"/api/v1/predictions/{prediction_id}/explanation?taxonomy=nope")
    assert unknown.status_code == 404 and "unknown taxonomy 'nope'" in unknown.get_json()["error"]
    page = client.get(f"/predictions/{prediction_id}?explain=nope")
    assert page.status_code == 404 and "no result in taxonomy" in page.get_data(as_text=True)


def test_taxonomy_without_a_live_model_is_a_clear_409(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    with app.app_context():
        import_bundle(make_bundle(seed=4, slug="test-topics", name="Test topics"))
    live_models_of(app).refresh()
    prediction_id = predict(client, None, abstracts[3]["abstract"])
    with app.app_context():
        db.session.scalar(select(Taxonomy).where(Taxonomy.slug == "test-topics")).active_version_id = None
        db.session.commit()
    live_models_of(app).refresh()
    refused = client.get(f"/api/v1/predictions/{prediction_id}/explanation?taxonomy=test-topics")
    assert refused.status_code == 409 and "'test-topics' has no model serving now" in refused.get_json()["error"]
    both = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()
    assert set(both["explanations"]) == {SLUG} and "no model serving" in both["errors"]["test-topics"]
    page = client.get(f"/predictions/{prediction_id}?explain=test-topics")
    assert page.status_code == 409 and "no model serving now" in page.get_data(as_text=True)


def test_a_prediction_by_another_version_says_which_model_explained_it(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    prediction_id = predict(client, abstracts[4]["title"], abstracts[4]["abstract"])
    with app.app_context():
        newer = import_bundle(make_bundle(seed=2)).version.id
        activate(newer)
    live_models_of(app).refresh()
    answer = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()["explanations"][SLUG]
    assert answer["model_version"] == newer and answer["same_version"] is False
    assert answer["prediction_model_version"] != newer and "version serving now" in answer["note"]


def test_page_renders_the_explanation_without_javascript(client: FlaskClient, abstracts: list[dict]) -> None:
    paper = abstracts[0]
    prediction_id = predict(client, paper["title"], paper["abstract"])
    plain = client.get(f"/predictions/{prediction_id}").get_data(as_text=True)
    assert "Why these labels?" in plain and 'src="/static/js/explain.js"' in plain
    assert "data-explained hidden" in plain and 'name="explain" value="test-tasks"' in plain
    answer = client.get(f"/api/v1/predictions/{prediction_id}/explanation").get_json()["explanations"][SLUG]
    # The label a sentence moves the most (the tiny model's tokenizer, trained per run, may change which one).
    entry = max(answer["labels"], key=lambda e: max(abs(s["drop"]) for s in e["sentences"] if s["read"]))
    page = client.get(f"/predictions/{prediction_id}", query_string={"explain": SLUG, "label": entry["label"]})
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "data-explained hidden" not in html
    assert f'<option value="{entry["label"]}" selected>' in html
    assert f"{entry['label']}: {entry['score'] * 100:.1f}%" in html
    strongest = max((s for s in entry["sentences"] if s["read"]), key=lambda s: abs(s["drop"]))
    css = heat_class(strongest["drop"], abs(strongest["drop"]))
    assert css != "heat-0", f"no sentence moves any label: {answer['labels']}"
    assert f"{strongest['drop'] * 100:+.1f}</sup>" in html and f'class="sent sent-{strongest["field"]} {css}"' in html
    assert html.count("sent-abstract unread") == sum(not s["read"] for s in entry["sentences"])
    wrong = client.get(f"/predictions/{prediction_id}", query_string={"explain": SLUG, "label": "Not A Label"})
    assert (
        wrong.status_code == 400
        and "&#39;Not A Label&#39; is not one of the labels explained here" in wrong.get_data(as_text=True)
    )
