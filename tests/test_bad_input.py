"""Every kind of bad input gets a clear 4xx, stores nothing and never a 500 (issue 2)."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from flask.testing import FlaskClient

from webapp.extensions import db
from webapp.models import Prediction

GOOD = "We propose a detector for small objects in aerial images and evaluate it on two benchmarks."


def stored(app: Flask) -> int:
    with app.app_context():
        return db.session.query(Prediction).count()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"abstract": ""}, "abstract is empty"),
        ({"abstract": "   \n\t  "}, "abstract is empty"),
        ({"abstract": "too short"}, "at least 20"),
        ({"abstract": "x" * 20_001}, "at most 20000"),
        ({"abstract": 42}, "abstract must be a string, not int"),
        ({"abstract": ["a list"]}, "abstract must be a string, not list"),
        ({"abstract": None}, "abstract is required"),
        ({"title": 7, "abstract": GOOD}, "title must be a string, not int"),
        ({"title": "t" * 501, "abstract": GOOD}, "title is 501 characters long; it must have at most 500"),
        ({"abstract": GOOD + "\x00"}, "NUL character"),
        ({"abstracts": []}, '"abstracts" is empty'),
        ({"abstracts": "not a list"}, "must be a list"),
        ({"abstracts": [{"abstract": GOOD}] * 65}, "has 65 items; at most 64"),
        ({"abstracts": [{"abstract": GOOD}, {"abstract": "short"}]}, "abstracts[1].abstract is 5 characters"),
        ({"abstracts": [{"abstract": GOOD}, "a string"]}, "abstracts[1] must be an object"),
        ({"abstracts": [{"abstract": GOOD}], "abstract": GOOD}, "not both"),
        ([GOOD], "send an object"),
        ("just a string", "send an object"),
    ],
)
def test_bad_predict_bodies_are_400(client: FlaskClient, app: Flask, body: object, message: str) -> None:
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert message in response.get_json()["error"]
    assert stored(app) == 0


def test_lone_surrogate_is_400(client: FlaskClient, app: Flask) -> None:
    raw = '{"abstract": "' + GOOD + ' \\ud800"}'
    response = client.post("/api/v1/predict", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "abstract holds an unpaired surrogate" in response.get_json()["error"]
    assert stored(app) == 0


def test_malformed_json_is_400(client: FlaskClient, app: Flask) -> None:
    response = client.post("/api/v1/predict", data='{"abstract": "unterminated', content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("the body is not valid JSON: Unterminated string")
    assert stored(app) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client: FlaskClient, app: Flask, content_type: str | None) -> None:
    kwargs = {"content_type": content_type} if content_type else {}
    response = client.post("/api/v1/predict", data=json.dumps({"abstract": GOOD}), **kwargs)
    assert response.status_code == 415
    assert "application/json" in response.get_json()["error"]
    assert stored(app) == 0


def test_body_over_the_limit_is_413_json(client: FlaskClient, app: Flask) -> None:
    body = json.dumps({"abstract": "word " * 500_000})  # 2.5 MB > MAX_CONTENT_LENGTH (2 MiB)
    response = client.post("/api/v1/predict", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"] == f"the request body is over the {2 * 1024 * 1024} byte limit"
    assert stored(app) == 0


def test_wrong_method_and_unknown_api_path_are_json(client: FlaskClient) -> None:
    response = client.get("/api/v1/predict")
    assert response.status_code == 405 and "error" in response.get_json()
    assert "POST" in response.headers["Allow"]
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.get_json()


@pytest.mark.parametrize("page", ["0", "-1", "abc", "1.5", "", "9999999999"])
def test_bad_page_numbers_are_400(client: FlaskClient, page: str) -> None:
    response = client.get(f"/history?page={page}")
    assert response.status_code == 400
    assert "page must be a whole number" in response.get_data(as_text=True)


def test_page_past_the_end_is_404(client: FlaskClient) -> None:
    assert client.get("/history?page=1").status_code == 200  # an empty history still has page 1
    response = client.get("/history?page=2")
    assert response.status_code == 404
    assert "there is no page 2" in response.get_data(as_text=True)


def test_bad_reviewed_filter_is_400(client: FlaskClient) -> None:
    assert client.get("/history?reviewed=maybe").status_code == 400


@pytest.mark.parametrize("path", ["/predictions/999999", "/predictions/abc", "/predictions/-3", "/nowhere"])
def test_unknown_ids_are_404(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "<html" in response.get_data(as_text=True)


def test_unknown_model_version_is_404(app: Flask, client: FlaskClient, runner) -> None:  # noqa: ANN001
    token = runner.invoke(args=["tokens", "create", "ops", "--role", "admin"]).output.strip().splitlines()[-1]
    response = client.post("/api/v1/models/no-such-version/activate", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404
    assert "no model version 'no-such-version'" in response.get_json()["error"]


def test_script_tags_are_rendered_as_text(client: FlaskClient) -> None:
    title = "<script>alert('t')</script>"
    abstract = "<script>alert('a')</script> " + GOOD + " <img src=x onerror=alert(1)>"
    response = client.post("/", data={"title": title, "abstract": abstract})
    assert response.status_code == 302
    for path in (response.headers["Location"], "/history", "/history?q=%3Cscript%3E"):
        page = client.get(path).get_data(as_text=True)
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(" in page


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"abstract": ""}, "abstract is empty"),
        ({"abstract": "     "}, "abstract is empty"),
        ({"abstract": "short one"}, "it must have at least 20"),
        ({"abstract": "y" * 20_001}, "it must have at most 20000"),
        ({"title": "t" * 501, "abstract": GOOD}, "title is 501 characters long"),
    ],
)
def test_bad_form_input_rerenders_with_400(client: FlaskClient, app: Flask, form: dict, message: str) -> None:
    response = client.post("/", data=form)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert stored(app) == 0


def test_form_needs_csrf_token(tmp_path, make_bundle) -> None:  # noqa: ANN001
    from tests.conftest import live_models_of, make_app
    from webapp.serving.registry import import_bundle

    app = make_app(tmp_path / "csrf", WTF_CSRF_ENABLED=True)
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1))
        client = app.test_client()
        response = client.post("/", data={"abstract": GOOD})
        assert response.status_code == 400
        assert "CSRF" in response.get_data(as_text=True)
        assert stored(app) == 0
        page = client.get("/").get_data(as_text=True)
        token = page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
        response = client.post("/", data={"abstract": GOOD, "csrf_token": token})
        assert response.status_code == 302
        assert stored(app) == 1
        # The token API is exempt from CSRF (it authenticates with bearer tokens instead).
        assert client.post("/api/v1/predict", json={"abstract": GOOD}).status_code == 200
    finally:
        live_models_of(app).stop()
