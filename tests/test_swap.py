"""Hot swap inside one process: the watcher loads a new active version off the request path, requests keep
working throughout, a version that cannot load never serves, and the disk cache is optional."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BundleFactory, live_models_of, make_app
from webapp.extensions import db
from webapp.models import ModelArtifact, ModelVersion, PredictionResult, Taxonomy
from webapp.serving.bundle import pack, read_manifest, sha256_hex
from webapp.serving.registry import activate, import_bundle, rollback


def wait_until_serving(app: Flask, version: str, slug: str = "test-tasks") -> None:
    """Wait until this process's watcher serves ``version``. How fast a swap reaches the workers (the 5 s
    contract) is bench/swap_time.py's to measure: a busy shared CI machine makes any bound here flaky."""
    live = live_models_of(app)
    while live.loaded().get(slug) != version:
        time.sleep(0.02)


def current_version(app: Flask) -> str:
    with app.app_context():
        return db.session.query(Taxonomy).filter_by(slug="test-tasks").one().active_version_id


def test_activation_reaches_the_worker_and_predictions_record_it(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    v1 = current_version(app)
    assert client.get("/healthz").get_json()["worker"]["loaded"] == {"test-tasks": v1}
    with app.app_context():
        v2 = import_bundle(make_bundle(seed=2, threshold=0.4)).version.id
        activate(v2)
    wait_until_serving(app, v2)
    body = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]}).get_json()
    result = body["predictions"][0]["results"]["test-tasks"]
    assert result["model_version"] == v2
    assert result["labels"] == sorted(
        (k for k, p in result["scores"].items() if p >= 0.4), key=lambda k: -result["scores"][k]
    )
    with app.app_context():
        row = db.session.query(PredictionResult).one()
        assert row.model_version_id == v2 and set(row.thresholds.values()) == {0.4}
    cached = Path(app.config["DATA_DIR"]) / "model-cache"
    assert len([p for p in cached.iterdir() if (p / "bundle.json").is_file()]) == 2


def test_swap_under_concurrent_requests_has_zero_failures(
    app: Flask, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    v1 = current_version(app)
    with app.app_context():
        v2 = import_bundle(make_bundle(seed=2, threshold=0.4)).version.id
    app.test_client().get("/healthz")  # start the watcher
    stop = threading.Event()
    failures: list[str] = []
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def hammer(n: int) -> None:
        client = app.test_client()
        i = n
        while not stop.is_set():
            paper = abstracts[i % len(abstracts)]
            i += 1
            response = client.post("/api/v1/predict", json={"title": f"{i}", "abstract": paper["abstract"]})
            with lock:
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.get_data(as_text=True)[:200]}")
                else:
                    served[response.get_json()["predictions"][0]["results"]["test-tasks"]["model_version"]] += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            with app.app_context():
                activate(v2)
            wait_until_serving(app, v2)
            time.sleep(0.3)
            with app.app_context():
                assert rollback("test-tasks").id == v1
            wait_until_serving(app, v1)
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert served[v1] > 0 and served[v2] > 0 and set(served) == {v1, v2}


def _store_unvalidated(app: Flask, bundle: Path) -> str:
    """Put a version in the database without the import checks, as a bundle that loads on the importing
    instance but not on this one (say another onnxruntime) would arrive; then activate it."""
    archive = pack(bundle)
    sha = sha256_hex(archive)
    manifest = read_manifest(bundle)
    with app.app_context():
        taxonomy = db.session.query(Taxonomy).filter_by(slug=manifest.taxonomy_slug).one()
        db.session.add(ModelArtifact(sha256=sha, data=archive, size=len(archive)))
        db.session.add(
            ModelVersion(
                id=f"{manifest.taxonomy_slug}-{sha[:10]}",
                taxonomy=taxonomy,
                artifact_sha256=sha,
                labels=manifest.labels,
                thresholds=manifest.thresholds,
                manifest={},
            )
        )
        db.session.commit()
        activate(f"{manifest.taxonomy_slug}-{sha[:10]}")
    return f"{manifest.taxonomy_slug}-{sha[:10]}"


def test_a_version_that_fails_to_load_never_serves(
    app: Flask, client: FlaskClient, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    v1 = current_version(app)
    client.get("/healthz")
    live = live_models_of(app)
    for broken, message in (
        ("corrupt-onnx", "head.onnx cannot be loaded"),
        ("label-count", "returns 7 scores"),
        ("nan", "smoke prediction returned non-finite scores"),
    ):
        bad = _store_unvalidated(app, make_bundle(seed=7, broken=broken))
        while bad not in live.errors:  # the watcher tries the broken version
            time.sleep(0.02)
        assert message in live.errors[bad]
        health = client.get("/healthz").get_json()
        assert health["status"] == "degraded"
        assert health["active"] == {"test-tasks": bad}
        assert health["worker"]["loaded"] == {"test-tasks": v1}
        response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
        assert response.status_code == 200
        assert response.get_json()["predictions"][0]["results"]["test-tasks"]["model_version"] == v1
        with app.app_context():
            version = db.session.get(ModelVersion, bad)
            assert version.status == "failed" and message in version.validation_error
            assert rollback("test-tasks").id == v1
        assert "failed to load" in client.get("/models").get_data(as_text=True)
    assert client.get("/healthz").get_json()["status"] == "ok"


def test_unwritable_model_cache_falls_back_to_a_temporary_directory(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    data_dir = tmp_path / "data"
    app = make_app(data_dir)
    (data_dir / "model-cache").write_text("a file where the cache directory should be")
    try:
        with app.app_context():
            version = import_bundle(make_bundle(seed=1)).version.id
        client = app.test_client()
        assert client.get("/healthz").get_json()["worker"]["loaded"] == {"test-tasks": version}
        assert client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]}).status_code == 200
    finally:
        live_models_of(app).stop()


@pytest.mark.parametrize("rotten", ["encoder.onnx", "head.onnx"])
def test_a_corrupt_cached_copy_is_fetched_again(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict], rotten: str
) -> None:
    data_dir = tmp_path / "data"
    first = make_app(data_dir)
    with first.app_context():
        imported = import_bundle(make_bundle(seed=1)).version
        version, sha = imported.id, imported.artifact_sha256
    first.test_client().get("/healthz")
    live_models_of(first).stop()
    cached = data_dir / "model-cache" / sha
    (cached / rotten).write_bytes(b"bit rot")
    second = make_app(data_dir)  # another worker starting on the same disk
    try:
        assert second.test_client().get("/healthz").get_json()["worker"]["loaded"] == {"test-tasks": version}
        assert (cached / rotten).read_bytes() != b"bit rot"
    finally:
        live_models_of(second).stop()
