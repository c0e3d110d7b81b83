"""Pages people use (form -> result, history with filters, detail, models), config layers, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, live_models_of, make_app
from webapp import ConfigurationError, create_app
from webapp.access.read_access import ANYONE, ENDPOINT_READS
from webapp.config import database_uri
from webapp.extensions import db
from webapp.models import AnnotationEvent, Prediction, PredictionResult, User
from webapp.serving.inference import LoadedModel
from webapp.serving.registry import activate, import_bundle
from webapp.serving.scoring import LabelScore, just_missed


def submit(client: FlaskClient, paper: dict, title: bool = True) -> int:
    response = client.post("/", data={"title": paper["title"] if title else "", "abstract": paper["abstract"]})
    assert response.status_code == 302, response.get_data(as_text=True)
    return int(re.search(r"/predictions/(\d+)", response.headers["Location"]).group(1))


def test_home_page_form(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert '<form method="post"' in page and 'name="abstract"' in page and 'name="title"' in page
    assert "Test tasks" in page and "8 labels" in page
    assert '<script src="/static/js/app.js"' in page and "<script>" not in page


def test_result_page_shows_labels_bars_thresholds_near_misses_and_version(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    prediction_id = submit(client, abstracts[0])
    page = client.get(f"/predictions/{prediction_id}?new=1").get_data(as_text=True)
    with app.app_context():
        result = db.session.scalar(select(PredictionResult))
        predicted, scores, version = result.labels, result.scores, result.model_version_id
    assert abstracts[0]["title"] in page
    assert version in page
    # Near misses: the 4 most probable other labels at half their threshold (0.5) or more; the far ones are left out.
    others = sorted((k for k in scores if k not in predicted), key=lambda k: -scores[k])
    missed = [k for k in others if scores[k] >= 0.25][:4]
    far = [k for k in others if scores[k] < 0.25]
    assert far, "the test needs a label far below its threshold"
    assert page.count('class="bar"') == len(predicted) + len(missed)
    assert page.count("≥ 50.0%") == page.count('class="bar"')  # each label's own threshold is shown
    for label in predicted:
        assert f"{scores[label] * 100:.1f}%" in page
    shown = re.findall(r'<li class="label-row missed">\s*<span class="label-name">([^<]*)<', page)
    assert shown == missed
    assert ("Just missed" in page) == bool(missed)
    assert "Tag another" in page


def test_just_missed_means_within_a_share_of_the_labels_own_threshold() -> None:
    rows = [
        LabelScore("chosen", 0.9, 0.5),
        LabelScore("close", 0.2, 0.3),
        LabelScore("at half", 0.15, 0.3),
        LabelScore("low threshold", 0.06, 0.1),
        LabelScore("under half", 0.04, 0.1),
        LabelScore("far", 0.001, 0.3),
    ]
    names = lambda *args: [row.label for row in just_missed(rows, {"chosen"}, *args)]  # noqa: E731
    assert names(4, 0.5) == ["close", "at half", "low threshold"]
    assert names(2, 0.5) == ["close", "at half"]
    assert names(4, 0.0) == ["close", "at half", "low threshold", "under half"]  # no floor: the most probable


def test_the_near_miss_floor_is_a_setting(make_bundle: BundleFactory, tmp_path: Path, abstracts: list[dict]) -> None:
    """0: no floor, the most probable labels however far below their thresholds (before the floor, every page)."""
    app = make_app(tmp_path / "data", NEAR_MISS_SHARE=0.0)
    with app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    client = app.test_client()
    prediction_id = submit(client, abstracts[0])
    with app.app_context():
        predicted = db.session.scalar(select(PredictionResult.labels))
    page = client.get(f"/predictions/{prediction_id}").get_data(as_text=True)
    assert page.count('class="label-row missed"') == min(4, 8 - len(predicted))


def test_line_breaks_count_once_whichever_way_they_came(app: Flask, client: FlaskClient) -> None:
    """A browser posts a textarea's line breaks as CRLF while its counter counts one character each: an abstract
    of exactly the limit passes, and is stored as the same text the API stores."""
    limit = app.config["ABSTRACT_MAX_CHARS"]
    lines = ["We translate sentences between languages with a neural model."] * (limit // 40)
    typed = "\n".join(lines)[:limit]
    assert len(typed) == limit and typed.count("\n") > 50
    stored_id = submit(client, {"title": "Line\r\nbreaks", "abstract": typed.replace("\n", "\r\n")})
    api = client.post("/api/v1/predict", json={"title": "Line\nbreaks", "abstract": typed.replace("\n", "\r")})
    assert api.status_code == 200, api.get_json()
    with app.app_context():
        web, by_api = (
            db.session.get(Prediction, stored_id),
            db.session.get(Prediction, api.get_json()["predictions"][0]["id"]),
        )
        assert web.abstract == by_api.abstract == typed
        assert web.title == by_api.title == "Line\nbreaks"
        assert web.text_sha256 == by_api.text_sha256


def test_result_page_shows_every_active_taxonomy(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    with app.app_context():
        import_bundle(make_bundle(seed=4, slug="test-topics", name="Test topics"))
    live_models_of(app).refresh()
    page = client.get(f"/predictions/{submit(client, abstracts[1])}").get_data(as_text=True)
    assert "Test tasks" in page and "Test topics" in page
    api = client.post("/api/v1/predict", json={"abstract": abstracts[1]["abstract"]}).get_json()
    assert set(api["predictions"][0]["results"]) == {"test-tasks", "test-topics"}


def test_history_lists_newest_first_and_paginates(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    app.config["HISTORY_PER_PAGE"] = 5
    client.post(
        "/api/v1/predict",
        json={"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:12]]},
    )
    page1 = client.get("/history").get_data(as_text=True)
    assert "12 predictions" in page1 and "Page 1 of 3" in page1
    with app.app_context():
        newest = db.session.scalars(select(Prediction).order_by(Prediction.id.desc())).first()
    assert page1.index(f"#{newest.id}<") < page1.index(f"#{newest.id - 1}<")
    page3 = client.get("/history?page=3").get_data(as_text=True)
    assert page3.count('class="card history-item"') == 2 and "← Newer" in page3 and "Older →" not in page3


def test_history_search_and_filters(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    batch = [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:6]]
    first = client.post("/api/v1/predict", json={"abstracts": batch}).get_json()["predictions"]
    with app.app_context():
        v2 = import_bundle(make_bundle(seed=2)).version.id
        activate(v2)
    live_models_of(app).refresh()
    second = client.post("/api/v1/predict", json={"abstracts": batch[:2]}).get_json()["predictions"]

    def listed(query: str) -> set[int]:
        response = client.get(f"/history?{query}")
        assert response.status_code == 200
        return {int(i) for i in re.findall(r'href="/predictions/(\d+)"', response.get_data(as_text=True))}

    word = abstracts[0]["title"].split()[0]
    assert {first[0]["id"], second[0]["id"]} <= listed(f"q={word}")
    assert listed("q=zzzz-no-such-words") == set()
    assert listed("q=%25") == set()  # % is no wildcard: a search without a word finds nothing (test_search.py)
    assert listed(f"version={v2}") == {p["id"] for p in second}
    label = next(label for p in first for label in p["results"]["test-tasks"]["labels"])
    with_label = {p["id"] for p in first + second if label in p["results"]["test-tasks"]["labels"]}
    assert listed(f"label={label}") == with_label
    with app.app_context():
        user = User(name="cur", role="curator")
        db.session.add(user)
        db.session.flush()
        db.session.add(AnnotationEvent(prediction_id=first[1]["id"], taxonomy_id=1, user_id=user.id, added=["X"]))
        db.session.commit()
    assert listed("reviewed=yes") == {first[1]["id"]}
    assert first[1]["id"] not in listed("reviewed=no") and first[0]["id"] in listed("reviewed=no")
    detail = client.get(f"/predictions/{first[1]['id']}").get_data(as_text=True)
    assert "cur" in detail and "added X" in detail


def test_models_page_lists_versions_and_log(app: Flask, client: FlaskClient) -> None:
    page = client.get("/models").get_data(as_text=True)
    assert "Test tasks" in page and "active" in page and "0.110" in page and "Activation log" in page


def test_inference_truncation_keeps_the_end_token(app: Flask) -> None:
    live = live_models_of(app)
    live.ensure_started()
    model: LoadedModel = next(iter(live.current().values())).model
    tokenizer = model.encoder.tokenizer
    windows, read, total = model.encoder.windows("word " * 5000)
    (window,) = windows  # the test bundle reads one window
    assert len(window) == model.manifest.max_length
    assert window[-1] == tokenizer.token_to_id("[SEP]")
    assert window[0] == tokenizer.token_to_id("[CLS]")
    assert read == model.manifest.max_length - 2
    assert total == len(tokenizer.encode("word " * 5000, add_special_tokens=False).ids) > read


def test_rate_limit_on_anonymous_prediction(tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]) -> None:
    app = make_app(tmp_path / "rl", RATELIMIT_ENABLED=True, PREDICT_RATE_LIMIT="2 per minute")
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1))
        client = app.test_client()
        body = {"abstract": abstracts[0]["abstract"]}
        assert [client.post("/api/v1/predict", json=body).status_code for _ in range(2)] == [200, 200]
        response = client.post("/api/v1/predict", json=body)
        assert response.status_code == 429 and "too many requests" in response.get_json()["error"]
    finally:
        live_models_of(app).stop()


def test_unreachable_database_is_503(tmp_path: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "DATA_DIR": str(tmp_path),
            "SECRET_KEY": "x",
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/missing-dir/db.sqlite",
        }
    )
    try:
        client = app.test_client()
        health = client.get("/healthz")
        assert health.status_code == 503 and "database unreachable" in health.get_json()["error"]
        assert client.get("/api/v1/taxonomies").status_code == 503
        response = client.get("/history")
        assert response.status_code == 503 and "database is unavailable" in response.get_data(as_text=True)
    finally:
        live_models_of(app).stop()


def test_production_refuses_to_start_without_secret_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("PAPERTAG_ENV", "production")
    with pytest.raises(ConfigurationError, match="SECRET_KEY must be set"):
        create_app({"DATA_DIR": str(tmp_path)})
    monkeypatch.setenv("SECRET_KEY", "from-the-environment-0123456789abcdef")
    app = create_app({"DATA_DIR": str(tmp_path)})
    assert app.config["SECRET_KEY"] == "from-the-environment-0123456789abcdef" and app.config["SESSION_COOKIE_SECURE"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"HISTORY_PER_PAGE": 0}, "HISTORY_PER_PAGE must be a whole number of at least 1, not 0"),
        ({"SEARCH_RANK_POOL": -5}, "SEARCH_RANK_POOL must be a whole number of at least 1, not -5"),
        ({"LIST_COUNT_CAP": "many"}, "LIST_COUNT_CAP must be a whole number of at least 1, not 'many'"),
        ({"BULK_MAX": 2.5}, "BULK_MAX must be a whole number of at least 1, not 2.5"),
        ({"MAX_BATCH": True}, "MAX_BATCH must be a whole number of at least 1, not True"),
        ({"JOB_WORKER_NICE": 20}, "JOB_WORKER_NICE must be a whole number from 0 to 19, not 20"),
        ({"QUALITY_DROP_MARGIN": 1.5}, "QUALITY_DROP_MARGIN must be a number from 0 to 1, not 1.5"),
        ({"NEAR_MISS_SHARE": 2}, "NEAR_MISS_SHARE must be a number from 0 to 1, not 2"),
        ({"MODEL_POLL_SECONDS": 0}, "MODEL_POLL_SECONDS must be a number of at least 0.01, not 0"),
        ({"PASSWORD_MIN_LENGTH": 4}, "PASSWORD_MIN_LENGTH must be a whole number of at least 8, not 4"),
        ({"SIMILAR_K": 60}, "SIMILAR_K (60) must not exceed SIMILAR_MAX_K (50)"),
        ({"ABSTRACT_MIN_CHARS": 30_000}, "ABSTRACT_MIN_CHARS (30000) must not exceed ABSTRACT_MAX_CHARS (20000)"),
        (
            {"PREDICT_RATE_LIMIT": "lots"},
            "PREDICT_RATE_LIMIT must be a rate limit such as '120 per minute', not 'lots'",
        ),
        ({"LOGIN_RATE_LIMIT": None}, "LOGIN_RATE_LIMIT must be a rate limit such as '120 per minute', not None"),
    ],
)
def test_settings_out_of_bounds_stop_the_start_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: dict, message: str
) -> None:
    monkeypatch.delenv("PAPERTAG_ENV", raising=False)
    with pytest.raises(ConfigurationError) as refused:
        create_app({"DATA_DIR": str(tmp_path / "data"), **given})
    assert str(refused.value) == message
    assert not (tmp_path / "data").exists()  # refused before anything is written


def test_an_environment_variable_that_is_not_a_number_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "two")
    with pytest.raises(
        ConfigurationError, match="environment variable WEB_CONCURRENCY must be a whole number, not 'two'"
    ):
        create_app({"DATA_DIR": str(tmp_path)})
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    monkeypatch.setenv("QUALITY_DROP_MARGIN", "a lot")
    with pytest.raises(ConfigurationError, match="QUALITY_DROP_MARGIN must be a number, not 'a lot'"):
        create_app({"DATA_DIR": str(tmp_path)})


def test_config_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SECRET_KEY", "PAPERTAG_ENV", "HISTORY_PER_PAGE", "DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "config.py").write_text("HISTORY_PER_PAGE = 7\nNEAR_MISSES = 2\nMODEL_POLL_SECONDS = 3.0\n")
    monkeypatch.setenv("MODEL_POLL_SECONDS", "1.5")
    monkeypatch.setenv("REPLAY_SAMPLE_SIZE", "50")
    monkeypatch.setenv("QUALITY_DROP_MARGIN", "0.2")
    app = create_app({"DATA_DIR": str(tmp_path), "NEAR_MISSES": 3})
    assert (app.config["REPLAY_SAMPLE_SIZE"], app.config["QUALITY_DROP_MARGIN"]) == (50, 0.2)
    assert app.config["HISTORY_PER_PAGE"] == 7  # instance file over the default
    assert app.config["MODEL_POLL_SECONDS"] == 1.5  # environment over the instance file, typed
    assert app.config["NEAR_MISSES"] == 3  # test mapping over everything
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path.resolve()}/papertag.db"
    # Development: one generated key, shared by every worker through DATA_DIR.
    assert app.config["SECRET_KEY"] == (tmp_path / "secret_key").read_text().strip()
    assert create_app({"DATA_DIR": str(tmp_path)}).config["SECRET_KEY"] == app.config["SECRET_KEY"]


def test_database_url_normalisation() -> None:
    assert database_uri("postgres://u:p@h/db", "/x") == "postgresql+psycopg://u:p@h/db"
    assert database_uri("postgresql://u@h:5432/db", "/x") == "postgresql+psycopg://u@h:5432/db"
    assert database_uri("postgresql+psycopg://u@h/db", "/x") == "postgresql+psycopg://u@h/db"
    assert database_uri("", "/srv/data") == "sqlite:////srv/data/papertag.db"


def test_unexpected_errors_are_a_clean_500_that_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(tmp_path / "boom")
    for endpoint in ("api_boom", "boom"):  # a route without a read rule is refused to anonymous readers
        monkeypatch.setitem(ENDPOINT_READS, endpoint, ANYONE)

    def boom() -> str:
        db.session.add(User(name="half-written", role="curator"))
        db.session.flush()
        raise RuntimeError("bug")

    app.add_url_rule("/api/v1/boom", "api_boom", boom)
    app.add_url_rule("/boom", "boom", boom)
    try:
        client = app.test_client()
        response = client.get("/api/v1/boom")
        assert response.status_code == 500 and list(response.get_json()) == ["error"]
        assert "bug" not in response.get_data(as_text=True)  # no internals leak
        response = client.get("/boom")
        assert response.status_code == 500 and "<html" in response.get_data(as_text=True)
        with app.app_context():
            assert db.session.scalar(select(User).where(User.name == "half-written")) is None
    finally:
        live_models_of(app).stop()
