"""Issue 11 point 7: rate limits count real clients behind a proxy, failed sign-ins are throttled per client (never
per user name alone, so nobody can lock the owner out), and API token callers have their own predict bucket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask, request

from tests.conftest import PASSWORD, add_user, live_models_of, make_app
from webapp.access.read_access import ANYONE, ENDPOINT_READS
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER

AppFactory = Callable[..., Flask]


@pytest.fixture
def limited_app(tmp_path: Path) -> Iterator[AppFactory]:
    """Build one app with rate limiting on (and the given settings); stopped afterwards."""
    apps: list[Flask] = []

    def build(**overrides: object) -> Flask:
        app = make_app(tmp_path / f"data{len(apps)}", RATELIMIT_ENABLED=True, **overrides)
        apps.append(app)
        return app

    yield build
    for app in apps:
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.engine.dispose()


def _predict(app: Flask, forwarded_for: str | None = None, token: str | None = None) -> int:
    """One call of the anonymous predict API (a 400 for an empty body: counted like any other call)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return app.test_client().post("/api/v1/predict", json={}, headers=headers).status_code


def test_forwarded_clients_get_their_own_bucket_behind_one_trusted_proxy(limited_app: AppFactory) -> None:
    app = limited_app(PREDICT_RATE_LIMIT="2 per minute", TRUSTED_PROXY_HOPS=1)
    assert [_predict(app, "203.0.113.1") for _ in range(3)] == [400, 400, 429]
    assert _predict(app, "203.0.113.2") == 400  # another client behind the same proxy
    # The proxy appends the address it saw: what the client wrote before it is not trusted.
    assert _predict(app, "203.0.113.9, 203.0.113.1") == 429


def test_forwarded_for_is_ignored_without_trusted_proxies(limited_app: AppFactory) -> None:
    app = limited_app(PREDICT_RATE_LIMIT="2 per minute")
    assert [_predict(app, "203.0.113.1") for _ in range(3)] == [400, 400, 429]
    assert _predict(app, "203.0.113.2") == 429  # a spoofed header does not buy a fresh bucket


def test_forwarded_proto_is_trusted_behind_the_proxy(limited_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    app = limited_app(TRUSTED_PROXY_HOPS=1)
    monkeypatch.setitem(ENDPOINT_READS, "<lambda>", ANYONE)  # a route of this test's own, readable by anyone
    app.add_url_rule("/scheme-seen", view_func=lambda: f"{request.scheme} {request.remote_addr}")
    seen = app.test_client().get("/scheme-seen", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.5"})
    assert seen.get_data(as_text=True) == "https 192.0.2.5"


def _sign_in(app: Flask, name: str, password: str, address: str) -> int:
    client = app.test_client()
    data = {"name": name, "password": password}
    return client.post("/login", data=data, environ_base={"REMOTE_ADDR": address}).status_code


def test_wrong_passwords_from_one_client_do_not_lock_the_owner_out(limited_app: AppFactory) -> None:
    app = limited_app(LOGIN_RATE_LIMIT="3 per minute", LOGIN_ADDRESS_RATE_LIMIT="5 per minute")
    add_user(app, "admin", "admin")
    attacker = "198.51.100.7"
    statuses = [_sign_in(app, "admin", f"guess {i}", attacker) for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert _sign_in(app, "admin", PASSWORD, attacker) == 429  # the guessing client waits, right password or not
    assert _sign_in(app, "admin", PASSWORD, "192.0.2.10") == 302  # the owner, elsewhere, signs in


def test_one_client_spraying_names_is_throttled_per_address(limited_app: AppFactory) -> None:
    app = limited_app(LOGIN_RATE_LIMIT="3 per minute", LOGIN_ADDRESS_RATE_LIMIT="4 per minute")
    attacker = "198.51.100.7"
    statuses = [_sign_in(app, f"user{i}", "guess", attacker) for i in range(5)]
    assert statuses == [401, 401, 401, 401, 429]


def _token(app: Flask, name: str) -> str:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", "curator"])
    return result.output.strip().splitlines()[-1]


def test_token_callers_do_not_share_the_anonymous_predict_limit(limited_app: AppFactory) -> None:
    app = limited_app(PREDICT_RATE_LIMIT="2 per minute", TOKEN_PREDICT_RATE_LIMIT="4 per minute")
    token, other = _token(app, "cora"), _token(app, "bob")
    assert [_predict(app) for _ in range(3)] == [400, 400, 429]
    assert [_predict(app, token=token) for _ in range(5)] == [400, 400, 400, 400, 429]
    assert _predict(app, token=other) == 400  # each token its own bucket
    assert _predict(app, token="pt_" + "x" * 43) == 401  # an unknown token is refused, not taken as anonymous
