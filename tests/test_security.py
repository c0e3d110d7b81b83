"""Security: CSRF on every form, cookie flags, security headers, rate limits, inert markup in every text field,
SQL-looking input, production without SECRET_KEY, and no secret in the logs. (The role x endpoint matrix is in
test_auth.py and test_admin_training.py.)"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, inspect, select

from tests.conftest import PASSWORD, BundleFactory, add_user, live_models_of, make_app, signed_in
from tests.test_batch import wait_for
from webapp.config import REPO_ROOT
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import (
    ActivationEvent,
    AnnotationEvent,
    ApiToken,
    BatchJob,
    LabelChange,
    LabelProposal,
    Prediction,
    TrainingRun,
)
from webapp.serving.registry import import_bundle

ABSTRACT = "We translate sentences between languages with a neural network and attention."
# Markup that would run if any page rendered it unescaped (no ";" or "|": labels may not contain them).
PAYLOAD = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
ESCAPED = ("&lt;script&gt;alert(", "&lt;img src=x onerror")  # what a page shows instead


@pytest.fixture
def research_app(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Flask]:
    """An app with ``research-tasks`` (which the trainer configs train, so Retrain forms exist)."""
    app = make_app(tmp_path / "data", WTF_CSRF_ENABLED=True)
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug="research-tasks", name="Research tasks"), actor="tests")
        import_bundle(make_bundle(seed=4, slug="research-tasks", name="Research tasks"), actor="tests")
    yield app
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in_with_csrf(app: Flask, name: str, role: str) -> FlaskClient:
    add_user(app, name, role)
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


WRITE_TABLES = (
    Prediction,
    AnnotationEvent,
    ApiToken,
    BatchJob,
    LabelProposal,
    LabelChange,
    TrainingRun,
    ActivationEvent,
)


def row_counts(app: Flask) -> dict[str, int]:
    with app.app_context():
        return {model.__name__: db.session.scalar(select(func.count()).select_from(model)) for model in WRITE_TABLES}


def test_every_form_refuses_a_post_without_csrf_token(research_app: Flask) -> None:
    app = research_app
    admin = sign_in_with_csrf(app, "ada", "admin")
    token = csrf_token(admin.get("/account/tokens").get_data(as_text=True))
    assert admin.post("/account/tokens", data={"name": "t", "expires": "30", "csrf_token": token}).status_code == 201
    assert admin.post("/", data={"abstract": ABSTRACT, "csrf_token": token}).status_code == 302
    with app.app_context():
        version = db.session.scalar(select(ActivationEvent.version_id))
        token_id = db.session.scalar(select(ApiToken.id))
    data = {
        "abstract": ABSTRACT,
        "name": "ada",
        "password": PASSWORD,
        "current": PASSWORD,
        "confirm": PASSWORD,
        "expires": "30",
        "labels": "Machine Translation",
        "based_on": "0",
        "action": "accept",
        "taxonomy": "research-tasks",
        "config": "default",
    }
    urls = {
        "predict.submit": "/",
        "accounts.login": "/login",
        "accounts.logout": "/logout",
        "accounts.password": "/account/password",
        "accounts.create_token": "/account/tokens",
        "accounts.revoke_token": f"/account/tokens/{token_id}/revoke",
        "curate.save": "/curate/predictions/1/research-tasks",
        "curate.review": "/curate/predictions/1",
        "curate.decide": "/curate/labels/1",
        "batch.upload": "/batches",
        "admin.activate_version": f"/models/{version}/activate",
        "replay.replay": f"/models/{version}/replay",
        "admin.rollback_taxonomy": "/taxonomies/research-tasks/rollback",
        "admin.retrain": "/training",
        "learned.learn_from_reviews": "/models/research-tasks/thresholds",
        "labels.change": "/taxonomies/research-tasks/labels/rename",
        "labels.undo": "/taxonomies/research-tasks/labels/changes/1/undo",
        "bulk.confirm": "/curate/bulk",
        "agreement.resolve": "/agreement/research-tasks/1",
    }
    forms = {
        rule.endpoint
        for rule in app.url_map.iter_rules()
        if "POST" in rule.methods and not rule.rule.startswith("/api/")
    }
    assert forms == set(urls), f"POST endpoints without a CSRF check in this test: {forms ^ set(urls)}"
    before = row_counts(app)
    for endpoint, url in urls.items():
        body = dict(data, file=(io.BytesIO(b"abstract\n" + ABSTRACT.encode()), "a.csv"))
        response = admin.post(url, data=body, content_type="multipart/form-data")
        assert response.status_code == 400, f"{endpoint}: {response.status_code} without a CSRF token"
        assert "CSRF token is missing" in response.get_data(as_text=True), endpoint
    assert row_counts(app) == before, "a POST refused for its missing CSRF token still changed the database"
    assert admin.get("/curate/queue").status_code == 200, "the refused /logout signed the admin out"


def set_cookie(response: object, name: str) -> str:
    cookies = [value for value in response.headers.getlist("Set-Cookie") if value.startswith(f"{name}=")]  # type: ignore[attr-defined]
    assert cookies, f"no {name} cookie was set"
    return cookies[-1]


def test_session_cookie_is_httponly_lax_and_secure_in_production(app: Flask, tmp_path: Path) -> None:
    add_user(app, "cora", "curator")
    response = app.test_client().post("/login", data={"name": "cora", "password": PASSWORD})
    cookie = set_cookie(response, "session")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie, cookie
    assert "Secure" not in cookie, "development over plain HTTP would lose its session with a Secure cookie"
    production = make_app(tmp_path / "prod", PAPERTAG_ENV="production")
    try:
        add_user(production, "cora", "curator")
        client = production.test_client()
        secure = set_cookie(client.post("/login", data={"name": "cora", "password": PASSWORD}), "session")
        assert "Secure" in secure and "HttpOnly" in secure and "SameSite=Lax" in secure, secure
    finally:
        live_models_of(production).stop()


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "text/html"),
        ("/history", "text/html"),
        ("/login", "text/html"),
        ("/nowhere", "text/html"),
        ("/healthz", "application/json"),
        ("/api/v1/taxonomies", "application/json"),
        ("/api/v1/nowhere", "application/json"),
        ("/static/css/app.css", "text/css"),
    ],
)
def test_security_headers_on_html_json_and_errors(client: FlaskClient, path: str, kind: str) -> None:
    response = client.get(path)
    assert response.mimetype == kind
    policy = dict(
        (part.strip().split(" ", 1) + [""])[:2] for part in response.headers["Content-Security-Policy"].split(";")
    )
    assert "'unsafe-inline'" not in policy["script-src"] and "'unsafe-eval'" not in policy["script-src"], policy
    assert policy["script-src"] == "'self'" and policy["object-src"] == "'none'", policy
    assert policy["frame-ancestors"] == "'none'", policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_templates_have_no_inline_script_the_policy_would_block() -> None:
    """The CSP forbids inline scripts, so a template with one would silently break in the browser."""
    for template in sorted((REPO_ROOT / "templates").rglob("*.html")):
        text = template.read_text(encoding="utf-8")
        inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", text)
        handlers = re.findall(r"\son[a-z]+\s*=", text)
        styles = re.findall(r"\sstyle\s*=|<style", text)
        assert not (inline or handlers or styles), f"{template.name}: inline {inline or handlers or styles}"


def test_web_form_prediction_is_rate_limited(tmp_path: Path, make_bundle: BundleFactory) -> None:
    app = make_app(tmp_path / "rl", RATELIMIT_ENABLED=True, PREDICT_RATE_LIMIT="2 per minute")
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1))
        client = app.test_client()
        assert [client.post("/", data={"abstract": ABSTRACT}).status_code for _ in range(2)] == [302, 302]
        refused = client.post("/", data={"abstract": ABSTRACT})
        assert refused.status_code == 429 and "too many requests" in refused.get_data(as_text=True)
        assert client.get("/").status_code == 200, "reading pages must not count against the prediction limit"
        with app.app_context():
            assert db.session.scalar(select(func.count()).select_from(Prediction)) == 2
    finally:
        live_models_of(app).stop()


def test_markup_in_every_text_field_is_rendered_inert(app: Flask) -> None:
    anonymous = app.test_client()
    assert anonymous.post("/", data={"title": PAYLOAD, "abstract": f"{PAYLOAD} {ABSTRACT}"}).status_code == 302
    curator = signed_in(app, "cora", "curator")
    saved = curator.post(
        "/curate/predictions/1/test-tasks",
        data={"labels": [], "note": PAYLOAD, "propose": PAYLOAD, "based_on": "0"},
    )
    assert saved.status_code == 302, saved.get_data(as_text=True)
    assert curator.post("/account/tokens", data={"name": PAYLOAD, "expires": "30"}).status_code == 201
    # A CSV whose title cell and a column name carry the markup, uploaded under a file name that does too.
    upload = f'title,abstract,{PAYLOAD.replace(chr(34), "")}\n"{PAYLOAD.replace(chr(34), chr(34) * 2)}",{ABSTRACT},x\n'
    uploaded = curator.post(
        "/batches",
        data={"file": (io.BytesIO(upload.encode()), "<img src=x onerror=alert(1)>.csv")},
        content_type="multipart/form-data",
    )
    assert uploaded.status_code == 302, uploaded.get_data(as_text=True)
    assert wait_for(curator, 1)["status"] == "finished"
    admin = signed_in(app, "ada", "admin")
    pages = {
        "/": (anonymous, False),
        "/history": (anonymous, True),
        f"/history?q={quote(PAYLOAD)}": (anonymous, True),
        "/predictions/1": (anonymous, True),
        "/predictions/2": (anonymous, True),
        "/curate/predictions/1": (curator, True),
        "/curate/queue": (curator, True),
        f"/curate/queue?label={quote(PAYLOAD)}": (curator, True),
        "/curate/labels": (admin, True),
        "/account/tokens": (admin, True),
        "/batches": (curator, True),
        "/batches/1": (curator, True),
        "/login?next=" + quote(f"/history?q={PAYLOAD}", safe=""): (anonymous, True),
    }
    for path, (client, shows_it) in pages.items():
        response = client.get(path)
        page = response.get_data(as_text=True)
        assert response.status_code == 200, (path, response.status_code)
        for raw in ("<script>alert(", "<img src=x onerror"):
            assert raw not in page, f"{path} renders user input as markup: {raw!r}"
        assert any(text in page for text in ESCAPED) or not shows_it, f"{path} should show the text, escaped"


SQL_TITLE = "Robert'); DROP TABLE prediction;-- 50% key_word"
SQL_ABSTRACT = f"' OR '1'='1' -- ; DELETE FROM users WHERE 'a'='a'; {ABSTRACT}"


def test_sql_looking_input_is_stored_verbatim_and_harmless(app: Flask, client: FlaskClient) -> None:
    # The innocent prediction first: storing the first one makes the vector index's tables
    # (webapp/evidence/similar_index.py), so the tables counted after it are those the injected text could add to or
    # drop.
    client.post("/api/v1/predict", json={"title": "an innocent title", "abstract": ABSTRACT})
    with app.app_context():
        tables = set(inspect(db.engine).get_table_names())
    response = client.post("/api/v1/predict", json={"title": SQL_TITLE, "abstract": SQL_ABSTRACT})
    assert response.status_code == 200
    with app.app_context():
        stored = db.session.get(Prediction, response.get_json()["predictions"][0]["id"])
        assert (stored.title, stored.abstract) == (SQL_TITLE, SQL_ABSTRACT)
        assert set(inspect(db.engine).get_table_names()) == tables
    found = client.get("/history", query_string={"q": "'); DROP TABLE"}).get_data(as_text=True)
    assert "1 prediction<" in found and "DROP TABLE prediction" in found.replace("&#39;", "'")
    # "%" and "_" are no wildcards: "50%" and "key_word" find only the text holding those words (not stop words,
    # which PostgreSQL's english configuration leaves out of its index).
    assert "1 prediction<" in client.get("/history", query_string={"q": "50%"}).get_data(as_text=True)
    assert "1 prediction<" in client.get("/history", query_string={"q": "key_word"}).get_data(as_text=True)
    for query in ({"label": "' OR 1=1 --"}, {"version": "x' OR '1'='1"}):
        assert "0 predictions" in client.get("/history", query_string=query).get_data(as_text=True), query
    # Full-text search reads only the words: "%' OR 1=1 --" is the word "1" (either), never an always-true clause.
    injected = client.get("/history", query_string={"q": "%' OR 1=1 --"}).get_data(as_text=True)
    assert "1 prediction<" in injected and "DROP TABLE prediction" in injected.replace("&#39;", "'")
    assert "1 prediction<" in client.get("/history", query_string={"q": "1"}).get_data(as_text=True)
    assert client.get("/history").status_code == 200


def test_production_refuses_to_start_without_secret_key_from_the_command_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DATABASE_URL"}}
    env.update(PAPERTAG_ENV="production", DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0, "a production start without SECRET_KEY went ahead"
    assert "papertag cannot start: SECRET_KEY must be set when PAPERTAG_ENV=production" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "papertag.db").exists() and not (tmp_path / "secret_key").exists()


def test_no_password_or_token_in_the_logs(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything, SQLAlchemy's statements and parameters included
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    password = "a-very-secret-passphrase"
    runner = app.test_cli_runner()
    created = runner.invoke(args=["users", "create", "ada", "--role", "admin"], input=f"{password}\n")
    assert created.exit_code == 0, created.output
    cli_token = runner.invoke(args=["tokens", "create", "ada", "--role", "admin"]).output.strip().splitlines()[-1]
    client = app.test_client()
    assert client.post("/login", data={"name": "ada", "password": "wrong " + password}).status_code == 401
    assert client.post("/login", data={"name": "ada", "password": password}).status_code == 302
    page = client.post("/account/tokens", data={"name": "laptop", "expires": "30"}).get_data(as_text=True)
    web_token = re.search(r"pt_[A-Za-z0-9_-]{43}", page).group(0)
    for token in (cli_token, web_token):
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/v1/annotations", headers=auth).status_code == 200
        assert client.get("/api/v1/annotations", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    logged = caplog.text
    assert "SELECT" in logged, "the database statements were not logged, so this test proves little"
    for secret in (password, cli_token, web_token, cli_token[3:20], web_token[3:20]):
        assert secret not in logged, "a password or API token reached the log"
