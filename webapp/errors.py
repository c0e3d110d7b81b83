"""Error responses: JSON under /api and /healthz, an HTML page elsewhere; never a bare 500."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, make_response, render_template, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, InternalServerError

from .extensions import db
from .serving.registry import RegistryError

log = logging.getLogger(__name__)

DATABASE_UNAVAILABLE = "the database is unavailable or busy; try again in a few seconds"


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def error_response(status: int, message: str) -> Response:
    """``{"error": message}`` for API clients, the error page for people."""
    if wants_json():
        response = jsonify(error=message)
    else:
        response = make_response(render_template("errors/error.html", status=status, message=message))
    response.status_code = status
    return response


def register(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        message = exc.description or exc.name
        if exc.code == 429:
            message = f"too many requests (limit: {message}); try again in a minute"
        elif exc.code == 413:
            message = f"the request body is over the {request.max_content_length} byte limit"
        response = error_response(exc.code or 500, message)
        if exc.code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="papertag"'
        if exc.code == 405 and exc.get_headers():
            response.headers.update({k: v for k, v in exc.get_headers() if k == "Allow"})
        return response

    @app.errorhandler(RegistryError)
    def unknown_record(exc: RegistryError) -> Response:
        """An unknown version, taxonomy or training run named in the URL or body."""
        db.session.rollback()
        return error_response(404, str(exc))

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError) -> Response:
        db.session.rollback()
        log.error("database error on %s %s: %s", request.method, request.path, exc.orig)
        return error_response(503, DATABASE_UNAVAILABLE)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        db.session.rollback()
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, InternalServerError.description)
