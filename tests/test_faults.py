"""Faults: broken bundles refused at every door, a locked database, a database that goes away and comes back,
and a full disk under the model cache. (A version that fails to load behind the registry's back is in
test_swap.py; a file where the cache directory should be, too.)"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import TEST_DATABASE_URL, BundleFactory, live_models_of, make_app
from tests.test_auth import _token as api_token
from webapp.errors import DATABASE_UNAVAILABLE
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import ModelVersion, Prediction
from webapp.serving.bundle import pack
from webapp.serving.registry import import_bundle

sqlite_only = pytest.mark.skipif(bool(TEST_DATABASE_URL), reason="simulates faults of SQLite's database file")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("label-count", "model returns 7 scores but the bundle lists 8 labels"),
        ("corrupt-onnx", "head.onnx cannot be loaded"),
        ("nan", "smoke prediction returned non-finite scores"),
        ("truncated", "not a readable .tar.gz bundle"),
    ],
)
def test_broken_bundles_are_refused_by_the_cli_and_the_api(
    app: Flask, make_bundle: BundleFactory, tmp_path: Path, broken: str, message: str
) -> None:
    if broken == "truncated":
        archive = pack(make_bundle(seed=5))
        archive = archive[: len(archive) // 2]
    else:
        archive = pack(make_bundle(seed=5, broken=broken))
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(archive)
    result = app.test_cli_runner().invoke(args=["models", "import", str(path)])
    assert result.exit_code != 0, f"the CLI imported a {broken} bundle"
    assert f"bundle refused: {message}" in result.output
    response = app.test_client().post(
        "/api/v1/models",
        data=archive,
        headers={**api_token(app, "ada", "admin"), "Content-Type": "application/gzip"},
    )
    assert response.status_code == 422 and message in response.get_json()["error"], response.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(ModelVersion).count() == 1, "a refused bundle was stored"


@pytest.fixture
def quiet_app(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Flask]:
    """An app whose background threads stay idle once started, so only the test's requests touch the
    database; ``SQLITE_BUSY_TIMEOUT`` is 1 s so a lock held longer fails fast."""
    app = make_app(tmp_path / "data", SQLITE_BUSY_TIMEOUT=1, MODEL_POLL_SECONDS=3600, BATCH_POLL_SECONDS=3600)
    with app.app_context():
        import_bundle(make_bundle(seed=1))
    yield app
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()


def database_file(app: Flask) -> Path:
    return Path(app.config["DATA_DIR"]) / "papertag.db"


def lock_database(app: Flask) -> sqlite3.Connection:
    """Another process's writer: an open write transaction holding SQLite's lock until it ends."""
    holder = sqlite3.connect(database_file(app), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def stored(app: Flask) -> int:
    with app.app_context():
        return db.session.query(Prediction).count()


@sqlite_only
def test_a_briefly_locked_database_makes_a_prediction_wait_then_succeed(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    app = make_app(tmp_path / "data")  # the default busy timeout (15 s)
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1))
        client = app.test_client()
        assert client.get("/healthz").status_code == 200  # models loaded before the lock
        holder = lock_database(app)
        released = threading.Event()

        def release() -> None:
            holder.rollback()
            released.set()

        threading.Timer(2.0, release).start()
        response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert released.is_set(), "the prediction was stored while another writer held the lock"
        assert stored(app) == 1
        holder.close()
    finally:
        live_models_of(app).stop()


@sqlite_only
def test_a_lock_held_past_the_busy_timeout_is_a_clear_503(quiet_app: Flask, abstracts: list[dict]) -> None:
    client = quiet_app.test_client()
    assert client.get("/healthz").status_code == 200
    holder = lock_database(quiet_app)
    try:
        response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
        assert response.status_code == 503 and response.get_json() == {"error": DATABASE_UNAVAILABLE}
        page = client.post("/", data={"abstract": abstracts[0]["abstract"]})
        assert page.status_code == 503 and DATABASE_UNAVAILABLE in page.get_data(as_text=True)
    finally:
        holder.rollback()
        holder.close()
    assert client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]}).status_code == 200
    assert stored(quiet_app) == 1, "a request refused with 503 stored something"


def expect_unavailable(client: FlaskClient, abstract: str) -> None:
    health = client.get("/healthz")
    assert health.status_code == 503 and "database unreachable" in health.get_json()["error"], health.get_json()
    response = client.post("/api/v1/predict", json={"abstract": abstract})
    assert response.status_code == 503 and response.get_json() == {"error": DATABASE_UNAVAILABLE}
    history = client.get("/history")
    assert history.status_code == 503 and DATABASE_UNAVAILABLE in history.get_data(as_text=True)


@sqlite_only
def test_the_database_gone_is_a_clear_503_and_recovers(quiet_app: Flask, abstracts: list[dict]) -> None:
    client = quiet_app.test_client()
    assert client.get("/healthz").get_json()["status"] == "ok"
    path = database_file(quiet_app)
    with quiet_app.app_context():
        db.engine.dispose()  # what a database server going away does to pooled connections
    away = path.with_name("away")
    away.mkdir()
    for part in path.parent.glob("papertag.db*"):
        part.rename(away / part.name)
    path.mkdir()  # a directory where the file was: SQLite cannot open it (root ignores file permissions)
    expect_unavailable(client, abstracts[0]["abstract"])
    path.rmdir()
    for part in away.iterdir():
        part.rename(path.parent / part.name)
    assert client.get("/healthz").get_json()["status"] == "ok", "the app did not recover when the database came back"
    assert client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]}).status_code == 200
    assert stored(quiet_app) == 1


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs: too small for any bundle, so writing the model cache fails with ENOSPC."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    tool = shutil.which("mount")
    command = [tool or "mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)]
    if not tool or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the cache fallback is also tested in test_swap.py")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def app_on_full_disk(tmp_path: Path, full_disk: Path, make_bundle: BundleFactory) -> Iterator[Flask]:
    """An app whose model cache directory lies on the full disk (built before the test, so the migrations'
    logging setup is done before the test's log capture starts)."""
    data_dir = tmp_path / "data"
    app = make_app(data_dir)
    (data_dir / "model-cache").symlink_to(full_disk, target_is_directory=True)
    with app.app_context():
        import_bundle(make_bundle(seed=1))
    yield app
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()


def test_a_full_disk_under_the_model_cache_falls_back_to_loading_from_the_database(
    app_on_full_disk: Flask, full_disk: Path, abstracts: list[dict], caplog: pytest.LogCaptureFixture
) -> None:
    client = app_on_full_disk.test_client()
    with app_on_full_disk.app_context():
        version = db.session.scalar(select(ModelVersion.id))
    health = client.get("/healthz").get_json()
    assert health["worker"]["loaded"] == {"test-tasks": version}, health
    assert "No space left on device" in caplog.text, "the cache write did not hit the full disk"
    response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
    assert response.status_code == 200
    assert response.get_json()["predictions"][0]["results"]["test-tasks"]["model_version"] == version
    assert list(full_disk.iterdir()) == [], "a partial copy was left in the cache"
