"""Signing in and out, and each user's API tokens (created here, shown once, revocable)."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_limiter.util import get_remote_address
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.wrappers import Response
from wtforms import HiddenField, PasswordField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length

from .auth import has_role, role_required
from .extensions import db, limiter
from .models import ApiToken, User, utcnow

bp = Blueprint("accounts", __name__)

# Deliberately the same whichever part was wrong, so the page never tells whether a user name exists.
BAD_CREDENTIALS = "Wrong user name or password."
# Compared against when the user does not exist, so both failures take the time of one password hash.
_DUMMY_HASH = generate_password_hash("papertag-no-such-user")


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
            login_user(user)
            flash(f"Signed in as {user.name} ({user.role}).", "info")
            return redirect(safe_next(form.next.data) or url_for("curate.queue"))
        form.form_errors.append(BAD_CREDENTIALS)
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("accounts/login.html", form=form), status


@bp.post("/logout")
def logout() -> Response:
    """POST with a CSRF token, so no other site can sign a curator out."""
    logout_user()
    flash("Signed out.", "info")
    return redirect(url_for("predict.index"))


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
