"""How a stored answer was made, through the real app: the best guess below threshold, the off-domain flag and the
part of the text the encoder read, in the API, the database and the result page; one encoder pass serves every
active taxonomy."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BundleFactory, live_models_of, make_app, signed_in
from tests.test_default_model import RESEARCH_TASKS
from tests.test_inference import SHORT
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import PredictionResult
from webapp.serving.bundle import compose_text
from webapp.serving.inference import Encoder
from webapp.serving.registry import import_bundle

AppFactory = Callable[..., Flask]


@pytest.fixture
def app_with(tmp_path: Path) -> Iterator[AppFactory]:
    """``app_with(bundle, ...)`` -> a migrated app whose registry holds these bundles (each one active)."""
    apps: list[Flask] = []

    def factory(*bundles: Path) -> Flask:
        app = make_app(tmp_path / f"data-{len(apps)}")
        apps.append(app)
        with app.app_context():
            for bundle in bundles:
                assert import_bundle(bundle, actor="tests").activated
        return app

    yield factory
    for app in apps:
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.engine.dispose()


def predict(client: FlaskClient, abstract: str, title: str | None = None) -> dict:
    response = client.post("/api/v1/predict", json={"title": title, "abstract": abstract})
    assert response.status_code == 200, response.get_data(as_text=True)
    (prediction,) = response.get_json()["predictions"]
    return prediction


def cards(client: FlaskClient, prediction_id: int) -> dict[str, str]:
    """The result page's card of each taxonomy, by slug."""
    response = client.get(f"/predictions/{prediction_id}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    pieces = page.split('<section class="card result"')[1:]
    return {re.search(r'<h2 id="tax-([^"]+)"', piece).group(1): piece for piece in pieces}


def test_a_long_abstract_says_how_much_of_it_was_read(
    app_with: AppFactory, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    app = app_with(make_bundle(seed=1, max_windows=2))
    client = app.test_client()
    paper = abstracts[0]
    response = client.post("/", data={"title": paper["title"], "abstract": paper["abstract"]})
    assert response.status_code == 302
    prediction_id = int(re.search(r"/predictions/(\d+)", response.headers["Location"]).group(1))
    with app.app_context():
        row = db.session.query(PredictionResult).filter_by(prediction_id=prediction_id).one()
        read, total = row.read_tokens, row.total_tokens
    tokenizer = live_models_of(app).current()["test-tasks"].model.encoder.tokenizer
    length = len(tokenizer.encode(compose_text(paper["title"], paper["abstract"]), add_special_tokens=False).ids)
    # Two windows of 126 word pieces sharing 8 read 244 of the abstract's (about 560).
    assert (read, total) == (244, length) and length > 244
    card = cards(client, prediction_id)["test-tasks"]
    assert 'data-flag="truncated"' in card
    assert re.search(rf"read the first 244 of the text's\s+{length} word pieces", card)

    answer = predict(client, SHORT)
    result = answer["results"]["test-tasks"]
    assert result["tokens_read"] == result["tokens_total"] > 0
    assert 'data-flag="truncated"' not in cards(client, answer["id"])["test-tasks"]
    api = predict(client, paper["abstract"], paper["title"])["results"]["test-tasks"]
    assert (api["tokens_read"], api["tokens_total"], api["lexical_whole_text"]) == (244, length, False)


def test_a_lexical_head_reports_what_the_encoder_read_and_that_its_lexical_part_read_the_rest(
    app_with: AppFactory, abstracts: list[dict]
) -> None:
    """``tokens_read`` is the encoder's reading whatever the head: the shipped head's TF-IDF part reads the whole
    text, and says so on its own (``lexical_whole_text``) rather than by counting every word piece as read."""
    app = app_with(RESEARCH_TASKS)
    client = app.test_client()
    model = live_models_of(app).current()["research-tasks"].model
    assert model.reads_text
    text = " ".join(paper["abstract"] for paper in abstracts[:3])
    total = len(model.encoder.tokenizer.encode(text, add_special_tokens=False).ids)
    read = model.manifest.read_tokens  # one window of 126 content word pieces
    assert read < total
    answer = predict(client, text)
    result = answer["results"]["research-tasks"]
    assert (result["tokens_read"], result["tokens_total"], result["lexical_whole_text"]) == (read, total, True)
    card = cards(client, answer["id"])["research-tasks"]
    assert re.search(
        rf"encoder read the first {read} of the text's\s+{total} word pieces; the model's word-frequency \(TF-IDF\) "
        "part read all of it",
        card,
    )
    short = predict(client, SHORT)["results"]["research-tasks"]
    assert short["tokens_read"] == short["tokens_total"] < read and short["lexical_whole_text"] is True


def test_best_guess_and_off_domain_in_the_api_the_database_and_the_page(
    app_with: AppFactory, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    # One model's scores (seed 1) under three decisions: a best guess, none, and an off-domain cut no abstract
    # can reach (cosine similarity is at most 1).
    app = app_with(
        make_bundle(seed=1, threshold=0.99, best_guess=True, slug="guess", name="Guess"),
        make_bundle(seed=1, threshold=0.99, slug="plain", name="Plain"),
        make_bundle(seed=1, threshold=0.99, best_guess=True, domain_threshold=1.0, slug="far", name="Far"),
    )
    client = app.test_client()
    body = {"abstracts": [{"title": p["title"], "abstract": p["abstract"]} for p in abstracts[:10]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    guessed = []
    for prediction in response.get_json()["predictions"]:
        guess, plain, far = (prediction["results"][slug] for slug in ("guess", "plain", "far"))
        scores = guess["scores"]
        assert scores == plain["scores"] == far["scores"]
        passing = sorted((label for label, p in scores.items() if p >= 0.99), key=lambda label: -scores[label])
        if passing:  # labels that pass are never a guess
            assert (guess["labels"], guess["below_threshold"]) == (plain["labels"], plain["below_threshold"])
            assert (guess["labels"], guess["below_threshold"]) == (passing, False)
        else:
            guessed.append(prediction)
            top = max(scores, key=scores.get)
            assert (guess["labels"], guess["below_threshold"], guess["off_domain"]) == ([top], True, False)
            assert (plain["labels"], plain["below_threshold"], plain["off_domain"]) == ([], False, False)
        assert (far["labels"], far["below_threshold"], far["off_domain"]) == (passing, False, True)
    assert guessed, "the test needs abstracts on which no label passes 0.99"
    answer = guessed[0]
    scores = answer["results"]["guess"]["scores"]
    top = max(scores, key=scores.get)

    with app.app_context():
        rows = {r.taxonomy.slug: r for r in db.session.query(PredictionResult).filter_by(prediction_id=answer["id"])}
        assert rows["guess"].best_guess and rows["guess"].labels == [top] and not rows["guess"].off_domain
        assert [p.label for p in rows["guess"].predicted] == [top]
        assert not rows["plain"].best_guess and rows["plain"].labels == []
        assert rows["far"].off_domain and not rows["far"].best_guess and rows["far"].labels == []
        assert rows["far"].domain == rows["guess"].domain < 1.0

    page = cards(client, answer["id"])
    assert 'data-flag="best-guess"' in page["guess"] and top in page["guess"]
    assert 'data-flag="off-domain"' not in page["guess"]
    assert 'data-flag="best-guess"' not in page["plain"] and "No label passed its threshold." in page["plain"]
    assert 'data-flag="off-domain"' in page["far"] and 'data-flag="best-guess"' not in page["far"]


def test_a_best_guess_is_marked_wherever_its_labels_are_shown_until_a_curator_accepts_it(
    app_with: AppFactory, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    """The labels card of the result page and the history say "best guess" as the model's card does; once a
    curator accepted the labels they are the curator's, not a guess."""
    app = app_with(
        make_bundle(seed=1, threshold=0.99, best_guess=True, slug="guess", name="Guess"),
        make_bundle(seed=1, slug="plain", name="Plain"),
    )
    client = app.test_client()
    body = {"abstracts": [{"title": p["title"], "abstract": p["abstract"]} for p in abstracts[:10]]}
    answers = client.post("/api/v1/predict", json=body).get_json()["predictions"]
    guessed = [a["id"] for a in answers if a["results"]["guess"]["below_threshold"]]
    assert guessed and not any(a["results"]["plain"]["below_threshold"] for a in answers)
    curator = signed_in(app, "cora", "curator")

    def marked(page: str, slug: str) -> bool:
        piece = page.split(f'data-taxonomy="{slug}"', 1)[1].split("</ul>", 1)[0]
        return 'data-flag="best-guess"' in piece and 'class="chip guess"' in piece

    detail = curator.get(f"/predictions/{guessed[0]}").get_data(as_text=True).split("What the model said")[0]
    assert marked(detail, "guess") and not marked(detail, "plain")
    history = curator.get("/history").get_data(as_text=True)
    assert marked(history.split(f'href="/predictions/{guessed[0]}"', 1)[1], "guess")

    token = app.test_cli_runner().invoke(args=["tokens", "create", "cora", "--role", "curator"])
    headers = {"Authorization": f"Bearer {token.output.strip().splitlines()[-1]}"}
    accepted = client.post(
        f"/api/v1/predictions/{guessed[0]}/annotations", json={"taxonomy": "guess", "action": "accept"}, headers=headers
    )
    assert accepted.status_code == 201, accepted.get_json()
    detail = curator.get(f"/predictions/{guessed[0]}").get_data(as_text=True).split("What the model said")[0]
    assert not marked(detail, "guess")


def test_one_encoder_pass_serves_every_active_taxonomy(
    app_with: AppFactory, make_bundle: BundleFactory, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_with(
        make_bundle(seed=1),
        make_bundle(seed=2, slug="test-topics", name="Test topics"),
        make_bundle(seed=3, slug="other-encoder", name="Other encoder", encoder_seed=1),
    )
    client = app.test_client()
    assert len(client.get("/healthz").get_json()["worker"]["loaded"]) == 3  # loaded (and smoke-tested) now
    live = live_models_of(app).current()
    assert live["test-tasks"].model.encoder is live["test-topics"].model.encoder
    assert live["other-encoder"].model.encoder is not live["test-tasks"].model.encoder

    runs: list[tuple[Encoder, int]] = []
    real = Encoder.run

    def counting(self: Encoder, texts: list[str]) -> list:
        if texts:
            runs.append((self, len(texts)))
        return real(self, texts)

    monkeypatch.setattr(Encoder, "run", counting)
    # One pass by design, not because the second taxonomy finds the texts in the encoder's cache.
    for entry in live.values():
        monkeypatch.setattr(entry.model.encoder, "_cache_size", 0)
    batch = [{"title": p["title"], "abstract": f"{p['abstract']} (one pass)"} for p in abstracts[:3]]
    response = client.post("/api/v1/predict", json={"abstracts": batch})
    assert response.status_code == 200
    assert sorted((id(encoder), n) for encoder, n in runs) == sorted(
        [(id(live["test-tasks"].model.encoder), 3), (id(live["other-encoder"].model.encoder), 3)]
    ), "one pass per distinct encoder, not one per taxonomy"
    for prediction in response.get_json()["predictions"]:
        assert set(prediction["results"]) == {"test-tasks", "test-topics", "other-encoder"}
