"""Signing in and out, revocable sessions, passwords, and each user's API tokens (created here, shown once,
revocable)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_limiter.util import get_remote_address
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select, update
from sqlalchemy.orm import joinedload, selectinload
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.wrappers import Response
from wtforms import HiddenField, PasswordField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, EqualTo, InputRequired, Length

from ..extensions import db, limiter
from ..models import ApiToken, User, UserSession, utcnow
from .auth import has_role, role_required

bp = Blueprint("accounts", __name__)

# Deliberately the same whichever part was wrong, so the page never tells whether a user name exists.
BAD_CREDENTIALS = "Wrong user name or password."
# Compared against when the user does not exist, so both failures take the time of one password hash.
_DUMMY_HASH = generate_password_hash("papertag-no-such-user")


def password_problem(password: str) -> str | None:
    """Why ``password`` may not be set, or None: every place that sets a password (this site, ``flask users``)
    asks here, so the rule is one rule."""
    least = current_app.config["PASSWORD_MIN_LENGTH"]
    if not password.strip():
        return "the password must not be only spaces (or empty)"
    if len(password) < least:
        return f"the password must have at least {least} characters"
    return None


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def sign_in(user: User) -> None:
    """Start a revocable session: a random key goes into the cookie (as Flask-Login's user id), its sha256 into
    ``user_sessions``; the cookie is worth nothing once that row is revoked."""
    key = secrets.token_urlsafe(32)
    db.session.add(UserSession(user_id=user.id, key_sha256=_key_hash(key)))
    db.session.commit()
    user.signed_in_key = key
    login_user(user)


def session_user(key: str) -> User | None:
    """Flask-Login's user loader: the active user of an unrevoked session key, else None (anonymous)."""
    row = db.session.scalar(
        select(UserSession)
        .options(joinedload(UserSession.user))  # one query per request for the session and its user
        .where(UserSession.key_sha256 == _key_hash(key), UserSession.revoked_at.is_(None))
    )
    if row is None or not row.user.active:
        return None
    row.user.signed_in_key = key
    return row.user


def revoke_sessions(user: User, keep: str | None = None) -> None:
    """End the user's sessions, all but the browser holding ``keep``; the caller commits."""
    statement = update(UserSession).where(UserSession.user_id == user.id, UserSession.revoked_at.is_(None))
    if keep:
        statement = statement.where(UserSession.key_sha256 != _key_hash(keep))
    db.session.execute(statement.values(revoked_at=utcnow()))


def change_password(user: User, password: str, keep: str | None = None) -> None:
    """Set a new password (checked by the caller with :func:`password_problem`) and sign out every other
    browser: whoever learnt the old password, or holds a copy of a cookie, is out."""
    user.set_password(password)
    revoke_sessions(user, keep=keep)
    db.session.commit()


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=120)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=500)])
    next = HiddenField()


def login_rate_limit() -> str:
    return current_app.config["LOGIN_RATE_LIMIT"]


def login_address_rate_limit() -> str:
    return current_app.config["LOGIN_ADDRESS_RATE_LIMIT"]


def _login_address_key() -> str:
    """Failed sign-ins from one client, whichever names it tries."""
    return "login-address:" + get_remote_address()


def _login_client_name_key() -> str:
    """Failed sign-ins from one client for one name: never the name alone, or a stranger who knows a user name
    could keep its owner out from everywhere."""
    return f"login-name:{get_remote_address()}:" + request.form.get("name", "").strip().lower()[:120]


def _failed(response: Response) -> bool:
    """Only failed attempts count against the limits (success redirects)."""
    return response.status_code != 302


def safe_next(target: str | None) -> str | None:
    """``target`` when it is a path on this site, else None: "next" must never send someone elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in target):  # CR/LF cannot be a header; browsers drop tabs
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(login_address_rate_limit, methods=["POST"], key_func=_login_address_key, deduct_when=_failed)
@limiter.limit(login_rate_limit, methods=["POST"], key_func=_login_client_name_key, deduct_when=_failed)
def login() -> Response | tuple[str, int]:
    form = LoginForm()
    if request.method == "GET":
        form.next.data = safe_next(request.args.get("next")) or ""
    status = 200
    if form.validate_on_submit():
        user = db.session.scalar(select(User).where(User.name == form.name.data.strip()))
        if user is None:
            check_password_hash(_DUMMY_HASH, form.password.data)
        elif user.check_password(form.password.data) and user.is_active:
            sign_in(user)
            flash(f"Signed in as {user.name} ({user.role}).", "info")
            return redirect(safe_next(form.next.data) or url_for("curate.queue"))
        form.form_errors.append(BAD_CREDENTIALS)
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("accounts/login.html", form=form), status


@bp.post("/logout")
def logout() -> Response:
    """POST with a CSRF token, so no other site can sign a curator out. Revokes the session's row, so a copy
    of the cookie stops working too."""
    key = getattr(current_user, "signed_in_key", None)
    if key:
        revoked = update(UserSession).where(UserSession.key_sha256 == _key_hash(key), UserSession.revoked_at.is_(None))
        db.session.execute(revoked.values(revoked_at=utcnow()))
        db.session.commit()
    logout_user()
    flash("Signed out.", "info")
    return redirect(url_for("predict.index"))


class PasswordForm(FlaskForm):
    # InputRequired, not DataRequired: a password of spaces gets password_problem's message, not "required".
    current = PasswordField("Current password", validators=[InputRequired(), Length(max=500)])
    password = PasswordField("New password", validators=[InputRequired(), Length(max=500)])
    confirm = PasswordField(
        "New password again",
        validators=[InputRequired(), EqualTo("password", message="the new passwords do not match")],
    )


def _password_change_key() -> str:
    """Wrong current passwords count per account: a borrowed session must not become a password oracle."""
    return f"password-change:{current_user.id if current_user.is_authenticated else get_remote_address()}"


@bp.route("/account/password", methods=["GET", "POST"])
@role_required("curator")
@limiter.limit(login_rate_limit, methods=["POST"], key_func=_password_change_key, deduct_when=_failed)
def password() -> Response | tuple[str, int]:
    """Change one's own password; this browser stays signed in, every other one is signed out."""
    form = PasswordForm()
    if form.validate_on_submit():
        problem = password_problem(form.password.data)
        if not current_user.check_password(form.current.data):
            form.current.errors.append("the current password is wrong")
        elif problem:
            form.password.errors.append(problem)
        else:
            change_password(current_user, form.password.data, keep=current_user.signed_in_key)
            flash("Password changed; every other browser signed in as you is signed out.", "info")
            return redirect(url_for("accounts.tokens"))
    status = 400 if request.method == "POST" else 200
    return render_template("accounts/password.html", form=form), status


EXPIRY_CHOICES = [
    SelectChoice(days, text) for days, text in (("30", "30 days"), ("90", "90 days"), ("365", "1 year"), ("0", "Never"))
]


class TokenForm(FlaskForm):
    name = StringField("What is it for?", validators=[DataRequired(), Length(max=120)])
    expires = SelectField("Expires after", choices=EXPIRY_CHOICES, default="90")


def _tokens_page(form: TokenForm, plain: str | None = None, status: int = 200) -> tuple[str, int]:
    query = select(ApiToken).options(selectinload(ApiToken.user)).order_by(ApiToken.created_at.desc())
    if not has_role(current_user, "admin"):
        query = query.where(ApiToken.user_id == current_user.id)
    tokens = db.session.scalars(query).all()
    return (
        render_template("accounts/tokens.html", form=form, tokens=tokens, plain=plain, now=utcnow()),
        status,
    )


@bp.get("/account/tokens")
@role_required("curator")
def tokens() -> tuple[str, int]:
    return _tokens_page(TokenForm())


@bp.post("/account/tokens")
@role_required("curator")
def create_token() -> tuple[str, int]:
    """The plain token is rendered in this response only (never flashed: the session cookie is not secret)."""
    form = TokenForm()
    if not form.validate_on_submit():
        return _tokens_page(form, status=400)
    token, plain = ApiToken.issue(current_user, name=form.name.data.strip())
    days = int(form.expires.data)
    if days:
        token.expires_at = utcnow() + timedelta(days=days)
    db.session.add(token)
    db.session.commit()
    return _tokens_page(TokenForm(formdata=None), plain=plain, status=201)


@bp.post("/account/tokens/<int:token_id>/revoke")
@role_required("curator")
def revoke_token(token_id: int) -> Response:
    """Curators revoke their own tokens; admins anyone's. Someone else's token is a 404 to curators.
    Button-only forms like this one are covered by the app-wide CSRFProtect."""
    token = db.session.get(ApiToken, token_id)
    if token is None or (token.user_id != current_user.id and not has_role(current_user, "admin")):
        abort(404, description=f"there is no token {token_id} of yours")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        db.session.commit()
    flash(f"Token “{token.name}” revoked; it no longer works.", "info")
    return redirect(url_for("accounts.tokens"))
