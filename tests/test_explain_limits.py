"""Bounds on what one request may cost (issue 11).

Point 1: the model work of one explanation is bounded by a constant whatever the abstract's length, an explanation
is computed once per (result, model version) and then read from the database, and the page form is rate-limited
like the API when it computes one. Point 13: memory a request used is handed back (onnxruntime's arenas shrink
after every run, glibc's free pages are trimmed after every request); the figures are bench/memory.py's. Point 15:
render.yaml runs the configuration bench/memory.py measured, and its workers' peaks fit the plan it names."""

from __future__ import annotations

import json
import runpy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import BundleFactory, live_models_of, make_app
from webapp.evidence.explain import occlusion_texts, units_of
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import Explanation, Prediction
from webapp.serving.inference import LoadedModel, load_and_validate
from webapp.serving.registry import import_bundle

SLUG = "test-tasks"
REPO = Path(__file__).resolve().parent.parent
RESEARCH_TASKS = REPO / "models" / "research-tasks"


def long_abstract(abstracts: list[dict], chars: int = 20_000) -> str:
    """Fixture abstracts run together up to ``chars`` characters, ending on a whole sentence."""
    text = ""
    while len(text) < chars:
        text += " ".join(paper["abstract"].strip() for paper in abstracts) + " "
    return text[:chars].rsplit(". ", 1)[0] + "."


class RunCounter:
    """Wraps a live model's encoder and head runs, counting the texts each is given (the model's work)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.encoder_texts, self.head_texts = model, 0, 0

    def __enter__(self) -> RunCounter:
        encoder, run, head = self.model.encoder, self.model.encoder.run, self.model.head_outputs

        def counted_run(texts: list[str]) -> list:
            self.encoder_texts += len(texts)
            return run(texts)

        def counted_head(texts: list[str], readings: list) -> tuple:
            self.head_texts += len(texts)
            return head(texts, readings)

        encoder.run, self.model.head_outputs = counted_run, counted_head
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.encoder.run, self.model.head_outputs  # the class's methods again


def predict(client: FlaskClient, title: str | None, abstract: str) -> int:
    response = client.post("/api/v1/predict", json={"title": title, "abstract": abstract})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["predictions"][0]["id"]


def model_of(app: Flask, slug: str) -> LoadedModel:
    return live_models_of(app).current()[slug].model


@pytest.fixture
def lexical_app(empty_app: Flask) -> Flask:
    """The shipped research-tasks bundle: its head has a lexical part that reads the whole text."""
    with empty_app.app_context():
        import_bundle(RESEARCH_TASKS, actor="tests")
    assert model_of(empty_app, "research-tasks").reads_text
    return empty_app


def test_units_are_bounded_and_cover_the_abstract_in_order(app: Flask, abstracts: list[dict]) -> None:
    abstract = long_abstract(abstracts)
    prediction = Prediction(title="A title", abstract=abstract)
    units = units_of(prediction, 32)
    assert len(units) <= 32 and units[0].field == "title"
    body = units[1:]
    assert all(a.end <= b.start for a, b in zip(body, body[1:], strict=False))
    assert body[0].start == 0 and body[-1].end == len(abstract)
    short = Prediction(title=None, abstract="One sentence here. Another one there.")
    assert [(u.start, u.end) for u in units_of(short, 32)] == [(0, 18), (19, 37)]


@pytest.mark.parametrize("max_windows", [1, 3])
def test_a_20000_character_abstract_costs_a_bounded_number_of_model_runs(
    empty_app: Flask, make_bundle: BundleFactory, abstracts: list[dict], max_windows: int
) -> None:
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1, max_windows=max_windows), actor="tests")
    client = empty_app.test_client()
    prediction_id = predict(client, "Long", long_abstract(abstracts))
    bound = 1 + empty_app.config["EXPLAIN_MAX_UNITS"]
    with RunCounter(model_of(empty_app, SLUG)) as runs:
        response = client.get(f"/api/v1/predictions/{prediction_id}/explanation")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert 1 <= runs.encoder_texts <= bound and 1 <= runs.head_texts <= bound
    sentences = response.get_json()["explanations"][SLUG]["labels"][0]["sentences"]
    assert len(sentences) <= bound - 1 and any(not s["read"] for s in sentences)


def test_a_lexical_head_explains_a_long_abstract_in_bounded_runs(lexical_app: Flask, abstracts: list[dict]) -> None:
    lexical_app.config["NEAR_MISS_SHARE"] = 0.0  # no label passes on this text: explain the closest ones anyway
    client = lexical_app.test_client()
    prediction_id = predict(client, "Detecting objects in long documents", long_abstract(abstracts))
    bound = 1 + lexical_app.config["EXPLAIN_MAX_UNITS"]
    with RunCounter(model_of(lexical_app, "research-tasks")) as runs:
        response = client.get(f"/api/v1/predictions/{prediction_id}/explanation")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert runs.encoder_texts < bound and runs.head_texts <= bound, "most variants reuse the full text's reading"
    units = response.get_json()["explanations"]["research-tasks"]["labels"][0]["sentences"]
    assert all(u["read"] for u in units), "the lexical part reads every sentence"


@pytest.mark.parametrize("bundle", ["tiny", "shipped"])
@pytest.mark.parametrize("title", ["Detecting objects in long documents", None])
def test_the_encoder_reads_each_cut_or_skipped_variant_as_the_whole_one(
    empty_app: Flask, make_bundle: BundleFactory, abstracts: list[dict], bundle: str, title: str | None
) -> None:
    """What lets the bound hold without changing a drop: a variant cut a sentence past the encoder's windows gives
    the windows of the whole variant, and a variant not run through the encoder has the full text's windows
    (exact token ids, with the tiny WordPiece and the shipped byte-level BPE tokenizers)."""
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1, max_windows=2) if bundle == "tiny" else RESEARCH_TASKS, actor="tests")
    slug = SLUG if bundle == "tiny" else "research-tasks"
    model = model_of(empty_app, slug)
    prediction = Prediction(title=title, abstract=" " + long_abstract(abstracts, 6_000) + "\n")
    with empty_app.app_context():
        units = units_of(prediction, empty_app.config["EXPLAIN_MAX_UNITS"])
    texts = occlusion_texts(model, prediction, units)

    def windows(text: str) -> list[list[int]]:
        return model.encoder.windows(text)[0]

    assert windows(texts.encoder_full) == windows(texts.full) and len(texts.encoder_full) < len(texts.full)
    assert 0 < len(texts.encoder_variants) < len(units)
    for i, variant in enumerate(texts.variants):
        assert windows(texts.encoder_variants.get(i, texts.full)) == windows(variant), units[i]


def test_an_explanation_is_computed_once_then_read_from_the_database(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    prediction_id = predict(client, abstracts[0]["title"], abstracts[0]["abstract"])
    url = f"/api/v1/predictions/{prediction_id}/explanation"
    with RunCounter(model_of(app, SLUG)) as first:
        computed = client.get(url).get_json()
    with RunCounter(model_of(app, SLUG)) as second:
        stored = client.get(url).get_json()
        page = client.get(f"/predictions/{prediction_id}", query_string={"explain": SLUG})
    assert first.encoder_texts > 0
    assert (second.encoder_texts, second.head_texts) == (0, 0) and stored == computed
    assert page.status_code == 200 and "data-explained hidden" not in page.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Explanation)) == 1


@pytest.fixture
def limited_app(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Flask]:
    app = make_app(tmp_path / "limited", RATELIMIT_ENABLED=True, PREDICT_RATE_LIMIT="2 per minute")
    with app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    yield app
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()


def test_the_page_form_is_rate_limited_only_when_it_computes(limited_app: Flask, abstracts: list[dict]) -> None:
    client = limited_app.test_client()
    body = {"abstracts": [{"title": p["title"], "abstract": p["abstract"]} for p in abstracts[:3]]}
    ids = [p["id"] for p in client.post("/api/v1/predict", json=body).get_json()["predictions"]]
    explain = {"explain": SLUG}
    assert [client.get(f"/predictions/{i}", query_string=explain).status_code for i in ids[:2]] == [200, 200]
    refused = client.get(f"/predictions/{ids[2]}", query_string=explain)
    html = refused.get_data(as_text=True)
    assert refused.status_code == 429 and "too many explanations computed for you" in html
    assert "2 per 1 minute" in html and abstracts[2]["abstract"][:40] in html, "the page itself still shows"
    # A stored explanation and a plain page view compute nothing, so they are not limited.
    assert client.get(f"/predictions/{ids[0]}", query_string=explain).status_code == 200
    assert client.get(f"/predictions/{ids[2]}").status_code == 200
    with limited_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Explanation)) == 2


class OptionsSeen:
    """An onnxruntime session wrapper recording the arena-shrinkage run option each run is given."""

    def __init__(self, session: object) -> None:
        self.session, self.shrinks = session, []

    def run(self, outputs: list[str], feeds: dict, options: object = None) -> list:
        entry = options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if options else None
        self.shrinks.append(entry)
        return self.session.run(outputs, feeds, options)

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


def test_every_model_run_hands_its_arena_back(make_bundle: BundleFactory, abstracts: list[dict]) -> None:
    """Without the option each session's arena keeps its largest run's memory for good (+100 MiB per worker after
    a mixed load); a lexical head (the shipped one) and the tiny ones alike."""
    for bundle in (make_bundle(seed=3), RESEARCH_TASKS):
        model = load_and_validate(bundle)
        encoder, head = model.encoder.session, model.head
        model.encoder.session, model.head = OptionsSeen(encoder), OptionsSeen(head)
        try:
            model.score([paper["abstract"] for paper in abstracts[:6]])
            model.logits([abstracts[7]["abstract"]])
            seen = model.encoder.session.shrinks + model.head.shrinks
        finally:
            model.encoder.session, model.head = encoder, head
        assert len(seen) >= 4 and set(seen) == {"cpu:0"}, seen


def test_gunicorn_trims_the_heap_after_every_request() -> None:
    """glibc keeps freed pages; the worker gives them back after each request rather than staying at its peak."""
    settings = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    trims: list[int] = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return 1

    settings["post_request"].__globals__["_LIBC"] = Libc()
    settings["post_request"](None, None, {}, None)
    settings["post_request"](None, None, {}, None)
    assert trims == [0, 0]


# Render's plans by memory, read strictly: "512 MB" as 512e6 bytes, in MiB as /proc and bench/memory.py count.
PLAN_MEMORY_MIB = {"starter": 512e6 / 2**20, "standard": 2e9 / 2**20, "pro": 4e9 / 2**20}


def test_the_render_blueprint_runs_what_was_measured_and_fits_its_plan() -> None:
    """The master plus WEB_CONCURRENCY workers at the peak RSS bench/memory.py measured for this configuration stay
    within 80% of the named plan's memory (a second worker on starter would be killed for memory)."""
    (service,) = [s for s in yaml.safe_load((REPO / "render.yaml").read_text())["services"] if s["type"] == "web"]
    env = {var["key"]: var.get("value") for var in service["envVars"] if "key" in var}  # not its settings group
    measured = json.loads((REPO / "bench" / "results" / "memory-starter.json").read_text())
    assert (env.get("GUNICORN_THREADS"), env.get("ORT_THREADS")) == (str(measured["threads"]), measured["ort_threads"])
    need = measured["master_mb"][1] + int(env["WEB_CONCURRENCY"]) * max(measured["worker_peak_mb"])
    assert need <= 0.8 * PLAN_MEMORY_MIB[service["plan"]], (need, service["plan"])
    assert max(measured["worker_after_idle_mb"]) < 300, "a worker gives back what the load took"
