"""papertag's web application: the factory that wires config, extensions, blueprints, errors and commands."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as config_module
from . import request_input
from .config import ConfigurationError
from .evidence.similar_index import load_sqlite_vec
from .extensions import csrf, db, limiter, login_manager, migrate

REPO_ROOT = config_module.REPO_ROOT


__all__ = ["ConfigurationError", "create_app"]


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. Config layers: defaults -> ``DATA_DIR/config.py`` -> environment -> ``test_config``."""
    test_config = dict(test_config or {})
    data_dir = Path(test_config.get("DATA_DIR") or os.environ.get("DATA_DIR") or config_module.Defaults.DATA_DIR)
    data_dir = data_dir.resolve()
    app = Flask(
        __name__,
        instance_path=str(data_dir),
        instance_relative_config=True,
        template_folder=str(REPO_ROOT / "templates"),
        static_folder=str(REPO_ROOT / "static"),
    )
    app.config.from_object(config_module.Defaults)
    app.config.from_pyfile("config.py", silent=True)
    app.config.update(config_module.from_environment(app.config, os.environ))
    app.config.update(test_config)
    app.config["DATA_DIR"] = str(data_dir)
    config_module.check(app.config)
    data_dir.mkdir(parents=True, exist_ok=True)
    _configure_secret(app)
    hops = app.config["TRUSTED_PROXY_HOPS"]
    if hops:  # the client's address and scheme as the proxies in front saw them, trusting exactly that many
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    uri = app.config.setdefault(
        "SQLALCHEMY_DATABASE_URI", config_module.database_uri(app.config["DATABASE_URL"], data_dir)
    )
    if uri.startswith("sqlite"):
        # sqlite3's timeout is SQLite's busy timeout: writers from several workers wait instead of failing.
        engine_options = {"connect_args": {"timeout": app.config["SQLITE_BUSY_TIMEOUT"]}}
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options)
    if app.config["PAPERTAG_ENV"] == "production":
        app.config["SESSION_COOKIE_SECURE"] = True
    _configure_logging(app)
    request_input.register(app)  # before the routes: their ids are bounded by its converter
    register_extensions(app)
    register_blueprints(app)
    register_access(app)
    register_errorhandlers(app)
    register_commands(app)
    app.after_request(_security_headers)
    return app


# A short key signs cookies that can be forged by guessing it offline; 32 random characters resist that.
SECRET_KEY_MIN_CHARS = 32
SECRET_KEY_HOW = (
    "a long random string, the same for every worker: python -c 'import secrets; print(secrets.token_hex(32))'"
)


def _configure_secret(app: Flask) -> None:
    """Production must be given SECRET_KEY; elsewhere one is generated once into DATA_DIR and shared."""
    production = app.config["PAPERTAG_ENV"] == "production"
    given = app.config.get("SECRET_KEY")
    if given and production and len(given.strip()) < SECRET_KEY_MIN_CHARS:
        raise ConfigurationError(
            f"SECRET_KEY has {len(given.strip())} characters; production needs at least {SECRET_KEY_MIN_CHARS} "
            f"characters ({SECRET_KEY_HOW})"
        )
    if given:
        return
    if production:
        raise ConfigurationError(f"SECRET_KEY must be set when PAPERTAG_ENV=production ({SECRET_KEY_HOW})")
    path = Path(app.config["DATA_DIR"]) / "secret_key"
    try:  # O_EXCL: when several workers start at once, exactly one writes and all read the same key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    key = ""
    for _ in range(50):  # another process may be between creating and writing the file
        key = path.read_text().strip()
        if key:
            break
        time.sleep(0.02)
    if not key:
        raise ConfigurationError(f"{path} is empty; delete it or set SECRET_KEY")
    app.config["SECRET_KEY"] = key


def _configure_logging(app: Flask) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("webapp").setLevel(logging.INFO)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside one writer (the busy timeout comes from the connect ``timeout``). A new database
    gets 16 KiB pages (an existing one keeps its size): a stored abstract is ~1.5 KB, and 4 KiB pages hold two with a
    third of the page left empty (bench/storage.py: 7% less database per stored prediction)."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA page_size=16384")  # before WAL: once a database is in WAL, its page size is fixed
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        # Similar papers' index (webapp/evidence/similar_index.py) is written on every connection.
        load_sqlite_vec(dbapi_connection)


def register_extensions(app: Flask) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=str(REPO_ROOT / "migrations"))
    csrf.init_app(app)
    login_manager.init_app(app)
    limiter.init_app(app)

    from .models import User
    from .serving.registry import EXTENSION_KEY, LiveModels

    @login_manager.user_loader
    def load_user(session_key: str) -> User | None:
        from .access.accounts import session_user

        return session_user(session_key)

    app.extensions[EXTENSION_KEY] = LiveModels(app)


def register_blueprints(app: Flask) -> None:
    from . import admin, api, labels, predict
    from .access import accounts
    from .curation import agreement, bulk, curate, label_issues
    from .evidence import explain, similar
    from .history import exports, views
    from .jobs import batch, replay
    from .quality import learned_thresholds, live

    app.register_blueprint(predict.bp)
    app.register_blueprint(views.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(accounts.bp)
    app.register_blueprint(curate.bp)
    app.register_blueprint(bulk.bp)
    app.register_blueprint(bulk.api_bp)
    app.register_blueprint(agreement.bp)
    app.register_blueprint(exports.bp)
    app.register_blueprint(batch.bp)
    app.register_blueprint(replay.bp)
    app.register_blueprint(explain.bp)
    app.register_blueprint(similar.bp)
    app.register_blueprint(labels.bp)
    app.register_blueprint(label_issues.bp)
    app.register_blueprint(live.bp)
    app.register_blueprint(learned_thresholds.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(api.health_bp)
    app.register_blueprint(replay.api_bp)
    app.register_blueprint(live.api_bp)
    app.register_blueprint(learned_thresholds.api_bp)
    csrf.exempt(api.bp)
    csrf.exempt(bulk.api_bp)
    csrf.exempt(live.api_bp)
    csrf.exempt(learned_thresholds.api_bp)
    csrf.exempt(replay.api_bp)


def register_access(app: Flask) -> None:
    from .access import auth, read_access

    auth.init_app(app)
    read_access.init_app(app)


def register_errorhandlers(app: Flask) -> None:
    from .errors import register

    register(app)


def register_commands(app: Flask) -> None:
    from .commands import models_cli, tokens_cli, users_cli
    from .jobs.worker import jobs_cli

    app.cli.add_command(jobs_cli)
    app.cli.add_command(models_cli)
    app.cli.add_command(users_cli)
    app.cli.add_command(tokens_cli)


# Scripts only from our own origin (no inline scripts), nothing framed, no MIME sniffing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


# One year, subdomains included: what HSTS preload lists ask for.
HSTS = "max-age=31536000; includeSubDomains"


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if current_app.config["PAPERTAG_ENV"] == "production":  # served over HTTPS only: browsers never try HTTP again
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    return response
