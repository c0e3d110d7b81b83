"""Who may do what: Bearer tokens for the API (the token carries its user's role) and signed-in roles for pages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any

from flask import Flask, abort, g, request
from flask_limiter.util import get_remote_address
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from ..extensions import db, login_manager
from ..models import ApiToken, User, utcnow

# An adjudicator may do what a curator may, plus resolve disagreements between curators (/agreement).
ROLE_RANK = {"curator": 1, "adjudicator": 2, "admin": 3}
# How precisely a token's last use is recorded: a write per call would make every read a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
log = logging.getLogger(__name__)


def bearer_token() -> ApiToken | None:
    """The usable API token this request presents (None without one, or for an unknown, revoked or expired one).
    Looked up once per request: rate limits key token callers by it as well as the views that need it."""
    if "bearer_token" not in g:
        scheme, _, plain = request.headers.get("Authorization", "").partition(" ")
        token = None
        if scheme.lower() == "bearer" and plain.strip():
            token = db.session.scalar(select(ApiToken).where(ApiToken.token_sha256 == ApiToken.hash(plain.strip())))
        g.bearer_token = token if token is not None and token.usable() else None
    return g.bearer_token


def refuse_unusable_token() -> None:
    """Before every request: a Bearer token that is unknown, revoked or expired is a 401 wherever it is sent, never
    a quiet fall back to anonymous (a script with a revoked token would predict on the anonymous rate limit, its
    calls stored as nobody's, until it met a 429). Other schemes (a proxy's Basic auth) are not the app's to judge."""
    scheme, _, plain = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or bearer_token() is not None:
        return
    if not plain.strip():
        abort(401, description="the Authorization header names no token: Authorization: Bearer <token>")
    abort(401, description="the API token is unknown, revoked or expired")


def init_app(app: Flask) -> None:
    app.before_request(refuse_unusable_token)


def client_key() -> str:
    """Rate-limit key: a caller with a usable API token is counted by its token, anyone else by address
    (``REMOTE_ADDR`` after ProxyFix has applied the trusted hops of ``X-Forwarded-For``)."""
    token = bearer_token()
    return f"token:{token.id}" if token is not None else get_remote_address()


def note_use(token: ApiToken) -> None:
    """Stamp ``last_used_at`` at most once per LAST_USED_RESOLUTION, and never let that bookkeeping fail the
    request: a read-only call must answer while another process holds the database's write lock."""
    now = utcnow()
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    token.last_used_at = now
    try:
        db.session.commit()
    except OperationalError as exc:
        db.session.rollback()
        log.warning("API token %s: last_used_at not recorded (%s)", token.id, exc.orig)


def token_user_role(required: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Require ``Authorization: Bearer <token>`` of a user whose role is at least ``required``."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            token = bearer_token()
            if token is None and not request.headers.get("Authorization", "").strip():
                abort(401, description="this endpoint needs an API token: Authorization: Bearer <token>")
            if token is None:
                abort(401, description="the API token is unknown, revoked or expired")
            if ROLE_RANK.get(token.user.role, 0) < ROLE_RANK[required]:
                abort(403, description=f"this endpoint needs the {required} role")
            note_use(token)
            g.api_user = token.user
            return view(*args, **kwargs)

        return wrapped

    return decorator


def has_role(user: User | Any, required: str) -> bool:
    """True for a signed-in user whose role is at least ``required`` (admins may do what curators may)."""
    return bool(user.is_authenticated) and ROLE_RANK.get(user.role, 0) >= ROLE_RANK[required]


def role_required(required: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Pages for signed-in users of at least ``required`` role: anonymous -> the sign-in page, too low -> 403.
    Checked on the server for every request, whatever the templates show."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return login_manager.unauthorized()
            if not has_role(current_user, required):
                abort(403, description=f"this page needs the {required} role")
            return view(*args, **kwargs)

        return wrapped

    return decorator
