"""Bearer-token authentication for the API's write endpoints (the token carries its user's role)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import abort, g, request
from sqlalchemy import select

from .extensions import db
from .models import ApiToken, utcnow

ROLE_RANK = {"curator": 1, "admin": 2}


def token_user_role(required: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Require ``Authorization: Bearer <token>`` of a user whose role is at least ``required``."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            scheme, _, plain = header.partition(" ")
            if scheme.lower() != "bearer" or not plain.strip():
                abort(401, description="this endpoint needs an API token: Authorization: Bearer <token>")
            token = db.session.scalar(select(ApiToken).where(ApiToken.token_sha256 == ApiToken.hash(plain.strip())))
            if token is None or not token.usable():
                abort(401, description="the API token is unknown, revoked or expired")
            if ROLE_RANK.get(token.user.role, 0) < ROLE_RANK[required]:
                abort(403, description=f"this endpoint needs the {required} role")
            token.last_used_at = utcnow()
            db.session.commit()
            g.api_user = token.user
            return view(*args, **kwargs)

        return wrapped

    return decorator
