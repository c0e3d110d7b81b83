"""Sign-in, CSRF, rate limits on failed sign-ins, tokens (page, revoke, expiry) and the role matrix."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import PASSWORD, add_user, make_app, signed_in
from webapp.access.accounts import BAD_CREDENTIALS, safe_next
from webapp.extensions import db
from webapp.models import ApiToken, Prediction, User, utcnow


def test_sign_in_redirects_to_a_local_next_only(app: Flask) -> None:
    add_user(app, "cora", "curator")
    client = app.test_client()
    page = client.get("/login?next=/history?q=x").get_data(as_text=True)
    assert 'value="/history?q=x"' in page
    response = client.post("/login", data={"name": "cora", "password": PASSWORD, "next": "/history?q=x"})
    assert response.status_code == 302 and response.headers["Location"] == "/history?q=x"
    assert client.get("/curate/queue").status_code == 200

    other = app.test_client()
    response = other.post("/login", data={"name": "cora", "password": PASSWORD, "next": "https://evil.example/"})
    assert response.headers["Location"] == "/curate/queue"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:x", ""])
def test_safe_next_refuses_other_sites(target: str) -> None:
    assert safe_next(target) is None


def test_wrong_password_and_unknown_user_get_the_same_message(app: Flask) -> None:
    add_user(app, "cora", "curator")
    client = app.test_client()
    wrong = client.post("/login", data={"name": "cora", "password": "not the password"})
    unknown = client.post("/login", data={"name": "nobody", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    for response in (wrong, unknown):
        assert BAD_CREDENTIALS in response.get_data(as_text=True)
    assert client.get("/curate/queue").status_code == 302  # still anonymous


def test_inactive_user_cannot_sign_in(app: Flask) -> None:
    user_id = add_user(app, "gone", "curator")
    with app.app_context():
        db.session.get(User, user_id).active = False
        db.session.commit()
    response = app.test_client().post("/login", data={"name": "gone", "password": PASSWORD})
    assert response.status_code == 401 and BAD_CREDENTIALS in response.get_data(as_text=True)


def test_sign_out_needs_post(curator_client: FlaskClient) -> None:
    assert curator_client.get("/logout").status_code == 405
    assert curator_client.post("/logout").status_code == 302
    assert curator_client.get("/curate/queue").status_code == 302


def test_repeated_failures_are_limited_per_client_and_name(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data", RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT="3 per minute")
    add_user(app, "cora", "curator")
    client = app.test_client()
    statuses = [client.post("/login", data={"name": "cora", "password": "wrong"}).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    # Even the right password waits now: the limit is what makes guessing slow.
    assert client.post("/login", data={"name": "cora", "password": PASSWORD}).status_code == 429
    # Never per name alone (issue 11 point 7): the owner on another address still signs in.
    other = {"REMOTE_ADDR": "10.0.0.2"}
    assert client.post("/login", data={"name": "cora", "password": PASSWORD}, environ_base=other).status_code == 302


def test_successful_sign_ins_do_not_count(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data", RATELIMIT_ENABLED=True, LOGIN_RATE_LIMIT="2 per minute")
    add_user(app, "cora", "curator")
    for _ in range(4):
        assert app.test_client().post("/login", data={"name": "cora", "password": PASSWORD}).status_code == 302


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1) or match.group(2)


def test_forms_without_csrf_token_are_refused(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data", WTF_CSRF_ENABLED=True)
    add_user(app, "cora", "curator")
    client = app.test_client()
    assert client.post("/login", data={"name": "cora", "password": PASSWORD}).status_code == 400
    token = _csrf(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"name": "cora", "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 302
    assert client.post("/account/tokens", data={"name": "x", "expires": "30"}).status_code == 400
    assert client.post("/logout").status_code == 400
    page = client.get("/account/tokens").get_data(as_text=True)
    created = client.post("/account/tokens", data={"name": "x", "expires": "30", "csrf_token": _csrf(page)})
    assert created.status_code == 201


def test_users_create_reads_the_password_from_stdin(app: Flask) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["users", "create", "ada", "--role", "admin"], input="s3cret-enough\n")
    assert result.exit_code == 0, result.output
    response = app.test_client().post("/login", data={"name": "ada", "password": "s3cret-enough"})
    assert response.status_code == 302
    short = runner.invoke(args=["users", "create", "eve"], input="short\n")
    assert short.exit_code != 0 and "at least 12" in short.output


def test_token_page_creates_once_and_revokes(app: Flask, curator_client: FlaskClient) -> None:
    response = curator_client.post("/account/tokens", data={"name": "laptop", "expires": "30"})
    assert response.status_code == 201
    plain = re.search(r"(pt_[A-Za-z0-9_-]{43})", response.get_data(as_text=True)).group(1)
    assert plain not in curator_client.get("/account/tokens").get_data(as_text=True)  # shown once
    auth = {"Authorization": f"Bearer {plain}"}
    assert curator_client.get("/api/v1/annotations", headers=auth).status_code == 200
    with app.app_context():
        token = db.session.scalar(select(ApiToken).where(ApiToken.token_sha256 == ApiToken.hash(plain)))
        assert token.expires_at is not None
        token_id = token.id
    assert curator_client.post(f"/account/tokens/{token_id}/revoke").status_code == 302
    refused = curator_client.get("/api/v1/annotations", headers=auth)
    assert refused.status_code == 401 and "revoked" in refused.get_json()["error"]


def test_curators_cannot_see_or_revoke_others_tokens(app: Flask, admin_client: FlaskClient) -> None:
    admin_client.post("/account/tokens", data={"name": "admin-box", "expires": "0"})
    with app.app_context():
        token_id = db.session.scalar(select(ApiToken.id).where(ApiToken.name == "admin-box"))
    curator = signed_in(app, "cora", "curator")
    curator.post("/account/tokens", data={"name": "cora-box", "expires": "0"})
    assert "admin-box" not in curator.get("/account/tokens").get_data(as_text=True)
    assert curator.post(f"/account/tokens/{token_id}/revoke").status_code == 404
    everything = admin_client.get("/account/tokens").get_data(as_text=True)
    assert "admin-box" in everything and "cora-box" in everything


def test_expired_token_is_refused(app: Flask) -> None:
    with app.app_context():
        user = User(name="cora", role="curator")
        token, plain = ApiToken.issue(user, "old")
        token.expires_at = utcnow() - timedelta(seconds=1)
        db.session.add_all([user, token])
        db.session.commit()
    response = app.test_client().get("/api/v1/annotations", headers={"Authorization": f"Bearer {plain}"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "/api/v1/predict"),  # anonymous callers may predict: a bad token must not pass as one
        ("GET", "/api/v1/predictions/1"),
        ("GET", "/api/v1/taxonomies"),
        ("GET", "/history"),
    ],
)
def test_an_unusable_bearer_token_is_refused_everywhere(app: Flask, method: str, url: str) -> None:
    client = app.test_client()
    abstract = {"abstract": "We translate sentences between languages."}
    assert client.post("/api/v1/predict", json=abstract).status_code == 200
    with app.app_context():
        user = User(name="cora", role="curator")
        revoked, revoked_plain = ApiToken.issue(user, "old laptop")
        revoked.revoked_at = utcnow()
        db.session.add_all([user, revoked])
        db.session.commit()
        stored = db.session.scalar(select(func.count(Prediction.id)))
    for header, reason in (
        ("Bearer pt_nope", "unknown, revoked or expired"),
        (f"Bearer {revoked_plain}", "unknown, revoked or expired"),
        ("bearer   ", "names no token"),
    ):
        response = client.open(
            url, method=method, json=abstract if method == "POST" else None, headers={"Authorization": header}
        )
        assert response.status_code == 401, (header, response.get_data(as_text=True)[:300])
        assert reason in response.get_data(as_text=True)  # a JSON body on the API, the error page on pages
    with app.app_context():
        assert db.session.scalar(select(func.count(Prediction.id))) == stored  # nothing stored as anonymous


def test_another_scheme_is_left_to_the_proxy_that_sent_it(app: Flask) -> None:
    """A site behind a proxy's Basic auth gets that header on every request: it is not a papertag token."""
    client = app.test_client()
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    body = {"abstract": "We translate sentences between languages."}
    assert client.post("/api/v1/predict", json=body, headers=basic).status_code == 200
    assert client.get("/", headers=basic).status_code == 200


# Every write (and curator-only) page: anonymous -> sign-in redirect (302), curator, admin.
PAGE_MATRIX = [
    ("GET", "/curate/queue", 302, 200, 200),
    ("GET", "/curate/predictions/1", 302, 200, 200),
    ("POST", "/curate/predictions/1/test-tasks", 302, 302, 302),
    ("POST", "/curate/predictions/1", 302, 400, 400),  # the page's one form; these fields name no taxonomy's
    ("GET", "/curate/labels", 302, 403, 200),
    ("POST", "/curate/labels/999", 302, 403, 404),
    ("GET", "/account/tokens", 302, 200, 200),
    ("POST", "/account/tokens", 302, 201, 201),
    ("POST", "/account/tokens/999/revoke", 302, 404, 404),
    ("GET", "/export", 302, 200, 200),
    ("GET", "/export/annotations.csv", 302, 200, 200),
    ("POST", "/", 302, 302, 302),  # anonymous visitors may still predict (redirected to the result)
]


@pytest.mark.parametrize(("method", "url", "anonymous", "curator", "admin"), PAGE_MATRIX)
def test_page_role_matrix(app: Flask, method: str, url: str, anonymous: int, curator: int, admin: int) -> None:
    client = app.test_client()
    client.post("/api/v1/predict", json={"title": "t", "abstract": "We translate sentences between languages."})
    data = {"abstract": "We translate sentences between languages.", "name": "x", "expires": "30", "based_on": "0"}
    clients = {
        "anonymous": client,
        "curator": signed_in(app, "cora", "curator"),
        "admin": signed_in(app, "ada", "admin"),
    }
    for role, expected in (("anonymous", anonymous), ("curator", curator), ("admin", admin)):
        response = clients[role].open(url, method=method, data=data if method == "POST" else None)
        body = response.get_data(as_text=True)  # drains streamed downloads too
        assert response.status_code == expected, (role, method, url, body[:300])
        if role == "anonymous" and expected == 302:
            assert response.headers["Location"].startswith("/login") == (url != "/")


def _token(app: Flask, name: str, role: str) -> dict[str, str]:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


API_MATRIX = [
    (
        "POST",
        "/api/v1/predictions/1/annotations",
        {"taxonomy": "test-tasks", "labels": [], "note": "ok"},
        401,
        201,
        201,
    ),
    ("GET", "/api/v1/annotations", None, 401, 200, 200),
    ("GET", "/api/v1/annotations.csv", None, 401, 200, 200),
    ("GET", "/api/v1/predictions.jsonl", None, 401, 200, 200),
    ("POST", "/api/v1/models/nope/activate", None, 401, 403, 404),
    ("POST", "/api/v1/training-runs/claim", None, 401, 403, 204),
    ("POST", "/api/v1/predict", {"abstract": "We translate sentences between languages."}, 200, 200, 200),
]


@pytest.mark.parametrize(("method", "url", "body", "anonymous", "curator", "admin"), API_MATRIX)
def test_api_role_matrix(
    app: Flask, method: str, url: str, body: dict | None, anonymous: int, curator: int, admin: int
) -> None:
    client = app.test_client()
    client.post("/api/v1/predict", json={"title": "t", "abstract": "We translate sentences between languages."})
    headers = {"anonymous": {}, "curator": _token(app, "cora", "curator"), "admin": _token(app, "ada", "admin")}
    for role, expected in (("anonymous", anonymous), ("curator", curator), ("admin", admin)):
        response = client.open(url, method=method, json=body, headers=headers[role])
        text = response.get_data(as_text=True)
        assert response.status_code == expected, (role, method, url, text[:300])
