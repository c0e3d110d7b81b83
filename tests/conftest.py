"""Shared fixtures: a real app on a real SQLite file (migrated with the real migrations) serving real tiny
ONNX bundles built by :mod:`tests.tiny_bundle`.

With ``TEST_DATABASE_URL`` set (a PostgreSQL server, see ``tests/services/postgres.sh``), every data directory
gets a fresh PostgreSQL database of its own instead of SQLite, dropped after the test. Apps queue background jobs
on Huey's SQLite storage in their data directory; ``redis_url`` gives the job engine's tests a Redis server
(``TEST_REDIS_URL``, or one ``tests/services/redis.sh`` starts for the session)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import flask_migrate
import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from psycopg import sql
from sqlalchemy.engine import make_url

from tests.tiny_bundle import TOKENIZER, build_bundle, fixture_abstracts
from webapp import create_app
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.jobs.engine import JobEngine
from webapp.serving.registry import import_bundle, live_models

BundleFactory = Callable[..., Path]
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
REPO = Path(__file__).resolve().parent.parent
# Databases made for the current test: resolved data dir -> URL (dropped by _isolate_tests).
_databases: dict[str, str] = {}
# Apps make_app built for the current test, their background threads stopped after it (by _isolate_tests).
_apps: list[Flask] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trainer: trains real models (slow); run on the SQLite pass only")


def _admin_connection() -> psycopg.Connection:
    """An autocommit connection to the PostgreSQL server's maintenance database (CREATE/DROP DATABASE)."""
    try:
        return psycopg.connect(TEST_DATABASE_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"TEST_DATABASE_URL={TEST_DATABASE_URL} is unreachable ({exc}); start it with "
            "`tests/services/postgres.sh start`"
        )


def database_url_for(data_dir: Path) -> str:
    """The ``DATABASE_URL`` for apps (in-process or gunicorn) on ``data_dir``: "" (SQLite in the data dir), or on
    the PostgreSQL pass a fresh database, the same one for every app on that data dir as for instances sharing it."""
    if not TEST_DATABASE_URL:
        return ""
    key = str(data_dir.resolve())
    if key not in _databases:
        name = f"papertag_test_{uuid.uuid4().hex[:12]}"
        with _admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        _databases[key] = make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    return _databases[key]


@pytest.fixture(autouse=True)
def _isolate_tests() -> Iterator[None]:
    """Each test's apps stop their model watchers (a poll every 0.2 s each, for the rest of the run otherwise) and
    job engines, then its PostgreSQL databases are dropped (FORCE closes what its apps left open)."""
    yield
    while _apps:
        app = _apps.pop()
        live_models_of(app).stop()
        job_engine_of(app).stop()
        with app.app_context():
            db.engine.dispose()
    if not _databases:
        return
    with _admin_connection() as conn:
        while _databases:
            name = make_url(_databases.popitem()[1]).database
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """The tiny models' tokenizer, trained once and kept (``tokenizers``' WordPiece trainer breaks ties differently
    from run to run, and a test model that changed with them made tests flaky)."""
    return TOKENIZER


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> BundleFactory:
    """``make_bundle(seed=1, threshold=0.5, slug=..., broken=...)`` -> a bundle directory (cached per arguments)."""
    root = tmp_path_factory.mktemp("bundles")
    made: dict[tuple, Path] = {}

    def factory(**kwargs: object) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in made:
            made[key] = build_bundle(root / f"bundle-{len(made)}", tokenizer_path, **kwargs)  # type: ignore[arg-type]
        return made[key]

    return factory


@pytest.fixture(scope="session")
def abstracts() -> list[dict]:
    return fixture_abstracts()


def make_app(data_dir: Path, **overrides: object) -> Flask:
    """A migrated app in ``data_dir`` (tests may build several, e.g. to act as another instance)."""
    config = {
        "TESTING": True,
        "DATA_DIR": str(data_dir),
        "SECRET_KEY": "test-secret-long-enough-for-production",  # production wants >= 32 characters
        "WTF_CSRF_ENABLED": False,
        "RATELIMIT_ENABLED": False,
        "DEFAULT_BUNDLES_DIR": str(data_dir / "no-default-models"),
        "MODEL_POLL_SECONDS": 0.2,
        "ORT_THREADS": 1,
        "DATABASE_URL": database_url_for(data_dir),
        **overrides,
    }
    app = create_app(config)
    _apps.append(app)
    with app.app_context():
        flask_migrate.upgrade()
    return app


@pytest.fixture
def empty_app(tmp_path: Path) -> Iterator[Flask]:
    """An app with a migrated database and no model."""
    app = make_app(tmp_path / "data")
    yield app
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()


def job_engine_of(app: Flask) -> JobEngine:
    return app.extensions[BATCH_WORKER]


@contextmanager
def running_jobs(app: Flask) -> Iterator[None]:
    """A thread running the app's queued jobs, as a worker process's consumer thread does, for tests of the pages
    and flows around jobs (tests/test_job_engine.py runs real worker processes)."""
    engine, stop = job_engine_of(app), threading.Event()

    def work() -> None:
        while not stop.wait(0.05):
            try:
                engine.run_pending()
            except Exception:  # the app may be torn down under it; the test's own assertions say what went wrong
                logging.getLogger(__name__).exception("running the queued jobs failed")
        engine.stop()  # this thread's connection to the queue

    thread = threading.Thread(target=work, name="test-job-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the job queue: ``TEST_REDIS_URL`` (``make test`` starts one), else one started here."""
    given = os.environ.get("TEST_REDIS_URL", "")
    if given:
        yield given
        return
    script = str(REPO / "tests" / "services" / "redis.sh")
    # A root of this session's own: another test run on the machine starts and stops the default one.
    env = {**os.environ, "PAPERTAG_REDIS_ROOT": tempfile.mkdtemp(prefix="papertag-redis-")}
    started = subprocess.run(["sh", script, "start"], capture_output=True, text=True, env=env)
    if started.returncode != 0:
        pytest.fail(f"tests/services/redis.sh could not start Redis: {started.stderr[-2000:]}")
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["sh", script, "stop"], check=False, env=env)


def live_models_of(app: Flask):  # noqa: ANN201 - test helper
    with app.app_context():
        return live_models()


@pytest.fixture
def app(empty_app: Flask, make_bundle: BundleFactory) -> Flask:
    """An app whose registry holds one active version of ``test-tasks`` (seed 1)."""
    with empty_app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    return empty_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


PASSWORD = "correct horse battery"


def add_user(app: Flask, name: str, role: str, password: str = PASSWORD) -> int:
    """A user with a hashed password (what ``flask users create`` makes); returns its id."""
    from webapp.models import User

    with app.app_context():
        user = User(name=name, role=role)
        user.set_password(password)
        db.session.add(user)
        db.session.commit()
        return user.id


def signed_in(app: Flask, name: str, role: str) -> FlaskClient:
    """A client signed in through the real sign-in form."""
    add_user(app, name, role)
    client = app.test_client()
    response = client.post("/login", data={"name": name, "password": PASSWORD})
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


@pytest.fixture
def curator_client(app: Flask) -> FlaskClient:
    return signed_in(app, "cora", "curator")


@pytest.fixture
def admin_client(app: Flask) -> FlaskClient:
    return signed_in(app, "ada", "admin")
