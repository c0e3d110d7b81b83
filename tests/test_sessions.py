"""Issue 11 points 8 and 11: signed-in sessions are rows that sign-out, a password change and deactivation revoke
(a captured cookie stops working), and weak settings are refused: short or blank passwords, a short production
SECRET_KEY; production sends HSTS."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.conftest import PASSWORD, add_user, live_models_of, make_app, signed_in
from webapp import ConfigurationError, create_app
from webapp.extensions import db
from webapp.models import User, UserSession

NEW_PASSWORD = "a much longer passphrase"


def _cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None, "no session cookie"
    return cookie.value


def _browser_with(app: Flask, cookie: str) -> FlaskClient:
    """Another browser replaying a captured session cookie."""
    client = app.test_client()
    client.set_cookie("session", cookie)
    return client


def _signed_in_page(client: FlaskClient) -> bool:
    return client.get("/curate/queue").status_code == 200


def _sign_in(app: Flask, name: str, password: str = PASSWORD) -> FlaskClient:
    client = app.test_client()
    assert client.post("/login", data={"name": name, "password": password}).status_code == 302
    return client


def test_a_cookie_captured_before_sign_out_no_longer_works(app: Flask) -> None:
    browser = signed_in(app, "cora", "curator")
    captured = _cookie(browser)
    assert _signed_in_page(_browser_with(app, captured))
    assert browser.post("/logout").status_code == 302
    assert not _signed_in_page(_browser_with(app, captured))
    with app.app_context():
        row = db.session.scalar(select(UserSession))
        assert row.revoked_at is not None


def test_the_cookie_holds_a_session_key_not_the_user_id(app: Flask) -> None:
    """A cookie signed with the app's key but naming a user id (what sign-in stored before) is not a session."""
    user_id = add_user(app, "cora", "curator")
    browser = app.test_client()
    with browser.session_transaction() as session:
        session["_user_id"] = str(user_id)
        session["_fresh"] = True
    assert not _signed_in_page(browser)


def test_a_password_change_ends_the_other_browsers_sessions(app: Flask) -> None:
    add_user(app, "cora", "curator")
    laptop, phone = _sign_in(app, "cora"), _sign_in(app, "cora")
    captured = _cookie(laptop)
    page = phone.get("/account/password")
    assert page.status_code == 200
    changed = phone.post(
        "/account/password",
        data={"current": PASSWORD, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert changed.status_code == 302, changed.get_data(as_text=True)
    assert _signed_in_page(phone)  # the browser that changed it stays signed in
    assert not _signed_in_page(laptop) and not _signed_in_page(_browser_with(app, captured))
    assert _sign_in(app, "cora", NEW_PASSWORD)
    assert app.test_client().post("/login", data={"name": "cora", "password": PASSWORD}).status_code == 401


def test_a_password_set_from_the_command_line_ends_every_session(app: Flask) -> None:
    browser = signed_in(app, "cora", "curator")
    result = app.test_cli_runner().invoke(args=["users", "create", "cora"], input=f"{NEW_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert not _signed_in_page(browser)


def test_deactivation_ends_every_session_and_token(app: Flask) -> None:
    browser = signed_in(app, "cora", "curator")
    runner = app.test_cli_runner()
    token = runner.invoke(args=["tokens", "create", "cora"]).output.strip().splitlines()[-1]
    result = runner.invoke(args=["users", "deactivate", "cora"])
    assert result.exit_code == 0, result.output
    assert not _signed_in_page(browser)
    assert app.test_client().get("/api/v1/annotations", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(UserSession.revoked_at.is_(None))) == 0
    assert app.test_client().post("/login", data={"name": "cora", "password": PASSWORD}).status_code == 401
    assert runner.invoke(args=["users", "deactivate", "nobody"]).exit_code != 0
    # An admin brings the account back with a new password; the old token stays dead.
    renewed = "a brand new passphrase"
    assert runner.invoke(args=["users", "create", "cora"], input=f"{renewed}\n").exit_code == 0
    assert app.test_client().post("/login", data={"name": "cora", "password": renewed}).status_code == 302
    assert app.test_client().get("/api/v1/annotations", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_user_deactivated_directly_in_the_database_is_signed_out(app: Flask) -> None:
    browser = signed_in(app, "cora", "curator")
    with app.app_context():
        db.session.scalar(select(User).where(User.name == "cora")).active = False
        db.session.commit()
    assert not _signed_in_page(browser)


# Point 11: weak passwords.
@pytest.mark.parametrize(
    ("password", "message"),
    [(" " * 12, "must not be only spaces"), ("short", "at least 12 characters"), ("elevenchars", "at least 12")],
)
def test_the_command_line_refuses_weak_passwords(app: Flask, password: str, message: str) -> None:
    result = app.test_cli_runner().invoke(args=["users", "create", "eve"], input=f"{password}\n")
    assert result.exit_code != 0 and message in result.output, result.output
    with app.app_context():
        assert db.session.scalar(select(User).where(User.name == "eve")) is None


@pytest.mark.parametrize(
    ("new", "confirm", "message"),
    [
        (" " * 20, " " * 20, "must not be only spaces"),
        ("tiny", "tiny", "at least 12 characters"),
        (NEW_PASSWORD, NEW_PASSWORD + "x", "do not match"),
    ],
)
def test_the_password_page_refuses_weak_passwords(app: Flask, new: str, confirm: str, message: str) -> None:
    browser = signed_in(app, "cora", "curator")
    response = browser.post("/account/password", data={"current": PASSWORD, "password": new, "confirm": confirm})
    assert response.status_code == 400 and message in response.get_data(as_text=True)
    assert _sign_in(app, "cora")  # the old password still works: nothing changed


def test_the_password_page_needs_the_current_password(app: Flask) -> None:
    browser = signed_in(app, "cora", "curator")
    data = {"current": "not the password", "password": NEW_PASSWORD, "confirm": NEW_PASSWORD}
    response = browser.post("/account/password", data=data)
    assert response.status_code == 400 and "current password is wrong" in response.get_data(as_text=True)
    assert _sign_in(app, "cora")
    assert app.test_client().get("/account/password").status_code == 302  # anonymous: to the sign-in page


# Point 11: production settings.
def test_production_refuses_a_short_secret_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        create_app({"DATA_DIR": str(tmp_path), "PAPERTAG_ENV": "production", "SECRET_KEY": "x"})
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        create_app({"DATA_DIR": str(tmp_path), "PAPERTAG_ENV": "production", "SECRET_KEY": " " * 40})


def test_production_sends_hsts_and_development_does_not(app: Flask, tmp_path: Path) -> None:
    assert "Strict-Transport-Security" not in app.test_client().get("/login").headers
    production = make_app(tmp_path / "prod", PAPERTAG_ENV="production")
    try:
        header = production.test_client().get("/login").headers.get("Strict-Transport-Security")
        assert header == "max-age=31536000; includeSubDomains"
    finally:
        live_models_of(production).stop()
