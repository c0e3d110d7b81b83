"""Registry: import (idempotent, validated), activate, rollback, the CLI and the bundle upload API."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select

from tests.conftest import BundleFactory
from webapp.extensions import db
from webapp.models import ActivationEvent, ModelArtifact, ModelVersion, Taxonomy, User
from webapp.serving.bundle import FORMAT_1_MESSAGE, BundleError, pack, sha256_hex, unpack
from webapp.serving.registry import RegistryError, activate, import_bundle, rollback


def active_version(app: Flask, slug: str = "test-tasks") -> str | None:
    with app.app_context():
        return db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == slug))


def test_import_is_content_addressed_and_idempotent(
    empty_app: Flask, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    bundle = make_bundle(seed=1)
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(pack(bundle))
    with empty_app.app_context():
        first = import_bundle(bundle)
        assert first.created and first.activated
        again = import_bundle(bundle)
        from_archive = import_bundle(archive)
        assert not again.created and not from_archive.created
        assert again.version.id == from_archive.version.id == first.version.id
        sha = first.version.artifact_sha256
        assert first.version.id == f"test-tasks-{sha[:10]}"
        assert db.session.query(ModelArtifact).count() == 1
        assert db.session.get(ModelArtifact, sha).size == len(pack(bundle))
        assert first.version.test_metrics["micro_f1"] == pytest.approx(0.11)


def test_second_version_is_inactive_until_activated_then_rolls_back(app: Flask, make_bundle: BundleFactory) -> None:
    with app.app_context():
        v1 = active_version(app)
        v2 = import_bundle(make_bundle(seed=2)).version.id
        v3 = import_bundle(make_bundle(seed=3)).version.id
        assert active_version(app) == v1
        activate(v2, actor="t")
        activate(v3, actor="t")
        assert active_version(app) == v3
        assert rollback("test-tasks").id == v2  # undo the last activation ...
        assert rollback("test-tasks").id == v1  # ... and the one before it
        with pytest.raises(RegistryError, match="no earlier version"):
            rollback("test-tasks")
        assert active_version(app) == v1
        actions = db.session.scalars(select(ActivationEvent.action).order_by(ActivationEvent.id)).all()
        assert actions == ["import", "activate", "activate", "rollback", "rollback"]
        with pytest.raises(RegistryError, match="no taxonomy"):
            rollback("nope")
        with pytest.raises(RegistryError, match="no model version"):
            activate("nope-123")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("label-count", "model returns 7 scores but the bundle lists 8 labels"),
        ("corrupt-onnx", "head.onnx cannot be loaded"),
        ("nan", "smoke prediction returned non-finite scores"),
    ],
)
def test_broken_bundles_are_refused(empty_app: Flask, make_bundle: BundleFactory, broken: str, message: str) -> None:
    with empty_app.app_context():
        with pytest.raises(BundleError, match=message):
            import_bundle(make_bundle(seed=5, broken=broken))
        assert db.session.query(ModelVersion).count() == 0
        assert db.session.query(ModelArtifact).count() == 0


def test_garbage_archive_is_refused(empty_app: Flask) -> None:
    with empty_app.app_context(), pytest.raises(BundleError, match="not a readable .tar.gz"):
        import_bundle(b"\x1f\x8b definitely not a gzip stream")


def test_cli_import_list_activate_rollback(app: Flask, runner: FlaskCliRunner, make_bundle: BundleFactory) -> None:
    v1 = active_version(app)
    result = runner.invoke(args=["models", "import", str(make_bundle(seed=2))])
    assert result.exit_code == 0, result.output
    v2 = result.output.strip().splitlines()[-1]
    assert v2.startswith("test-tasks-") and v2 != v1
    assert "not active" in result.output
    listing = runner.invoke(args=["models", "list"]).output
    assert f"* {v1}" in listing and f"  {v2}" in listing
    assert runner.invoke(args=["models", "activate", v2]).exit_code == 0
    assert active_version(app) == v2
    assert f"* {v2}" in runner.invoke(args=["models", "list"]).output
    result = runner.invoke(args=["models", "rollback", "test-tasks"])
    assert result.exit_code == 0 and v1 in result.output
    assert active_version(app) == v1
    result = runner.invoke(args=["models", "rollback", "test-tasks"])
    assert result.exit_code != 0 and "no earlier version" in result.output
    result = runner.invoke(args=["models", "activate", "missing-version"])
    assert result.exit_code != 0 and "no model version" in result.output


def test_cli_refuses_a_broken_bundle(app: Flask, runner: FlaskCliRunner, make_bundle: BundleFactory) -> None:
    result = runner.invoke(args=["models", "import", str(make_bundle(seed=5, broken="label-count"))])
    assert result.exit_code != 0
    assert "bundle refused: model returns 7 scores but the bundle lists 8 labels" in result.output
    with app.app_context():
        assert db.session.query(ModelVersion).count() == 1


def test_import_defaults_only_when_the_taxonomy_has_no_version(
    empty_app: Flask, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    defaults = tmp_path / "models"
    defaults.mkdir()
    shutil.copytree(make_bundle(seed=1), defaults / "test-tasks")
    shutil.copytree(make_bundle(seed=1, slug="test-topics", name="Test topics"), defaults / "test-topics")
    shutil.copytree(make_bundle(seed=1, broken="nan", slug="broken-one", name="Broken"), defaults / "broken-one")
    empty_app.config["DEFAULT_BUNDLES_DIR"] = str(defaults)
    runner = empty_app.test_cli_runner()
    first = runner.invoke(args=["models", "import-defaults"])
    assert first.exit_code == 0, first.output
    assert "REFUSED: smoke prediction returned non-finite scores" in first.output
    assert first.output.count("imported test-t") == 2
    second = runner.invoke(args=["models", "import-defaults"])
    assert "already has versions, skipped" in second.output and "imported" not in second.output
    assert active_version(empty_app, "test-topics") is not None
    empty_app.config["DEFAULT_BUNDLES_DIR"] = str(tmp_path / "missing")
    assert "nothing to import" in runner.invoke(args=["models", "import-defaults"]).output


def test_users_and_tokens(app: Flask, runner: FlaskCliRunner, client: FlaskClient, make_bundle: BundleFactory) -> None:
    result = runner.invoke(args=["users", "create", "carol", "--role", "curator"], input="correct horse\n")
    assert result.exit_code == 0 and "created curator carol" in result.output
    short = runner.invoke(args=["users", "create", "dave"], input="short\n")
    assert short.exit_code != 0 and "at least 12" in short.output
    with app.app_context():
        carol = db.session.scalar(select(User).where(User.name == "carol"))
        assert carol.check_password("correct horse") and not carol.check_password("wrong")
        assert "correct horse" not in carol.password_hash
    curator = runner.invoke(args=["tokens", "create", "carol", "--role", "curator"]).output.strip().splitlines()[-1]
    admin = runner.invoke(args=["tokens", "create", "root", "--role", "admin"]).output.strip().splitlines()[-1]
    assert curator.startswith("pt_") and admin.startswith("pt_") and curator != admin
    clash = runner.invoke(args=["tokens", "create", "carol", "--role", "admin"])
    assert clash.exit_code != 0 and "exists with role curator" in clash.output

    archive = pack(make_bundle(seed=2))
    assert client.post("/api/v1/models", data=_upload(archive)).status_code == 401
    response = client.post("/api/v1/models", data=_upload(archive), headers={"Authorization": "Bearer pt_wrong"})
    assert response.status_code == 401 and "unknown" in response.get_json()["error"]
    headers = {"Authorization": f"Bearer {curator}"}
    response = client.post("/api/v1/models", data=_upload(archive), headers=headers)
    assert response.status_code == 403 and "admin role" in response.get_json()["error"]

    headers = {"Authorization": f"Bearer {admin}"}
    response = client.post("/api/v1/models", data=_upload(archive), headers=headers)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["created"] and not body["active"] and body["taxonomy"] == "test-tasks"
    again = client.post("/api/v1/models", data=archive, headers=headers, content_type="application/gzip")
    assert again.status_code == 200 and again.get_json()["id"] == body["id"] and not again.get_json()["created"]
    response = client.post(f"/api/v1/models/{body['id']}/activate", headers=headers)
    assert response.status_code == 200 and response.get_json()["active"]
    assert active_version(app) == body["id"]

    broken = pack(make_bundle(seed=5, broken="corrupt-onnx"))
    response = client.post("/api/v1/models", data=_upload(broken), headers=headers)
    assert response.status_code == 422 and "head.onnx cannot be loaded" in response.get_json()["error"]
    response = client.post("/api/v1/models", data={"other": (io.BytesIO(b"x"), "x.bin")}, headers=headers)
    assert response.status_code == 400 and '"bundle"' in response.get_json()["error"]
    response = client.post("/api/v1/models", json={"x": 1}, headers=headers)
    assert response.status_code == 415
    with app.app_context():
        assert db.session.query(ModelVersion).count() == 2
        assert db.session.query(ModelArtifact).count() == 2

    listing = client.get("/api/v1/models").get_json()["models"]
    assert {m["id"] for m in listing} == {body["id"], app_version_ids(app)[0]}


def _upload(archive: bytes) -> dict:
    return {"bundle": (io.BytesIO(archive), "bundle.tar.gz")}


def app_version_ids(app: Flask) -> list[str]:
    with app.app_context():
        return db.session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at)).all()


def test_a_cached_bundle_in_place_is_never_replaced_under_a_reader(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """Workers booting together unpack the same artifact into the model cache: the first copy renamed into place
    stays (another worker may be reading it), later ones are dropped; an ordinary unpack still replaces."""
    archive = pack(make_bundle(seed=1))
    cached = tmp_path / "model-cache" / "sha"
    unpack(archive, cached, keep_existing=True)
    first = {path.name: path.stat().st_ino for path in cached.iterdir()}
    unpack(archive, cached, keep_existing=True)
    assert {path.name: path.stat().st_ino for path in cached.iterdir()} == first
    assert [p.name for p in cached.parent.iterdir()] == ["sha"], "a dropped copy was left behind"
    unpack(archive, cached)
    assert {path.name: path.stat().st_ino for path in cached.iterdir()} != first


def format_1_bundle(target: Path, format_2: Path) -> Path:
    """A bundle as papertag wrote them before format 2: ``model.onnx`` (any graph; it is never loaded),
    ``tokenizer.json`` and a ``bundle.json`` with ``format_version`` 1."""
    manifest = json.loads((format_2 / "bundle.json").read_text(encoding="utf-8"))
    for key in ("max_windows", "window_overlap", "best_guess", "domain_threshold", "encoder_sha256"):
        del manifest[key]
    manifest["format_version"] = 1
    target.mkdir()
    (target / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    shutil.copyfile(format_2 / "head.onnx", target / "model.onnx")
    shutil.copyfile(format_2 / "tokenizer.json", target / "tokenizer.json")
    return target


def format_1_archive(bundle_dir: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name in ("model.onnx", "tokenizer.json", "bundle.json"):
            tar.add(bundle_dir / name, arcname=name)
    return raw.getvalue()


def test_a_format_1_bundle_is_refused_everywhere_with_a_clear_message(
    app: Flask, runner: FlaskCliRunner, client: FlaskClient, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    old = format_1_bundle(tmp_path / "old", make_bundle(seed=2))
    archive = tmp_path / "old.tar.gz"
    archive.write_bytes(format_1_archive(old))
    for source in (old, archive):
        result = runner.invoke(args=["models", "import", str(source)])
        assert result.exit_code != 0, f"the CLI imported a format-1 {source.name}"
        assert f"bundle refused: {FORMAT_1_MESSAGE}" in result.output
    admin = runner.invoke(args=["tokens", "create", "root", "--role", "admin"]).output.strip().splitlines()[-1]
    response = client.post(
        "/api/v1/models", data=_upload(archive.read_bytes()), headers={"Authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 422 and FORMAT_1_MESSAGE in response.get_json()["error"]
    # A format-1 manifest inside an archive of format-2 files is refused the same way.
    (old / "encoder.onnx").write_bytes(b"x")
    (old / "head.onnx").write_bytes(b"x")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name in ("encoder.onnx", "head.onnx", "tokenizer.json", "bundle.json"):
            tar.add(old / name, arcname=name)
    with app.app_context(), pytest.raises(BundleError, match="format-1 bundle"):
        import_bundle(raw.getvalue())
    with app.app_context():
        assert db.session.query(ModelVersion).count() == 1, "a format-1 bundle was stored"
        assert db.session.query(ModelArtifact).count() == 1


def shipped_and_format_1(empty_app: Flask, make_bundle: BundleFactory, tmp_path: Path) -> tuple[Path, Callable]:
    """A defaults folder holding a format-2 bundle of taxonomy test-tasks, and a function that stores a format-1
    version of it straight in the database and makes it active (import would refuse it now)."""
    shipped = make_bundle(seed=1)
    defaults = tmp_path / "models"
    defaults.mkdir()
    shutil.copytree(shipped, defaults / "test-tasks")
    empty_app.config["DEFAULT_BUNDLES_DIR"] = str(defaults)
    old = format_1_bundle(tmp_path / "old", make_bundle(seed=2))
    data = format_1_archive(old)
    manifest = json.loads((old / "bundle.json").read_text(encoding="utf-8"))

    def activate_format_1() -> None:
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == "test-tasks"))
        if taxonomy is None:
            taxonomy = Taxonomy(slug="test-tasks", name="Test tasks")
            db.session.add(taxonomy)
        db.session.add(ModelArtifact(sha256=sha256_hex(data), data=data, size=len(data)))
        version = ModelVersion(
            id="test-tasks-format1",
            taxonomy=taxonomy,
            artifact_sha256=sha256_hex(data),
            labels=manifest["labels"],
            thresholds=manifest["thresholds"],
            manifest=manifest,
        )
        db.session.add(version)
        db.session.flush()
        db.session.add(ActivationEvent(taxonomy_id=taxonomy.id, version_id=version.id, action="import"))
        taxonomy.active_version_id = version.id
        db.session.commit()

    return shipped, activate_format_1


def test_import_defaults_replaces_an_active_format_1_version(
    empty_app: Flask, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    _, activate_format_1 = shipped_and_format_1(empty_app, make_bundle, tmp_path)
    with empty_app.app_context():
        activate_format_1()
    client = empty_app.test_client()
    # The old version cannot serve, and the worker says why.
    health = client.get("/healthz").get_json()
    assert health["worker"]["loaded"] == {}
    assert FORMAT_1_MESSAGE in health["worker"]["errors"]["test-tasks-format1"]

    runner = empty_app.test_cli_runner()
    result = runner.invoke(args=["models", "import-defaults"])
    assert result.exit_code == 0, result.output
    new = active_version(empty_app)
    assert new not in (None, "test-tasks-format1") and new.startswith("test-tasks-")
    assert f"imported {new} (active, replacing test-tasks-format1, a format-1 bundle" in result.output
    with empty_app.app_context():
        assert db.session.get(ModelVersion, new).manifest["format_version"] == 2
        history = db.session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at)).all()
        assert history == ["test-tasks-format1", new], "the old version stays in the history"
        event = db.session.scalars(select(ActivationEvent).order_by(ActivationEvent.id.desc())).first()
        assert (event.version_id, event.previous_version_id) == (new, "test-tasks-format1")

    again = runner.invoke(args=["models", "import-defaults"])
    assert "already has versions, skipped" in again.output and "imported" not in again.output
    assert active_version(empty_app) == new


def test_import_defaults_activates_an_already_imported_shipped_bundle_over_format_1(
    empty_app: Flask, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """The shipped bundle was imported earlier, then a format-1 version was made active again: the next start
    activates the shipped one (it is already stored, so nothing new is imported)."""
    shipped, activate_format_1 = shipped_and_format_1(empty_app, make_bundle, tmp_path)
    with empty_app.app_context():
        current = import_bundle(shipped).version.id
        activate_format_1()
    result = empty_app.test_cli_runner().invoke(args=["models", "import-defaults"])
    assert result.exit_code == 0, result.output
    assert f"{current} (active, replacing test-tasks-format1" in result.output
    assert active_version(empty_app) == current


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("thresholds", "huge", "every threshold must be a number strictly between 0 and 1"),
        ("thresholds", "nan", "NaN is not a JSON number"),
        ("max_windows", True, "max_windows"),
        ("guess_floor", False, "guess_floor: must be a number"),
        ("domain_threshold", "1e400", "domain_threshold: must be null or a number"),
    ],
)
def test_manifest_numbers_of_the_wrong_kind_are_refused_not_a_500(
    app: Flask,
    client: FlaskClient,
    runner: FlaskCliRunner,
    make_bundle: BundleFactory,
    tmp_path: Path,
    key: str,
    value: object,
    message: str,
) -> None:
    """Huge integers (float() overflows), NaN, booleans where numbers belong: a 422 naming the field."""
    bundle = Path(shutil.copytree(make_bundle(seed=5), tmp_path / "bundle"))
    text = (bundle / "bundle.json").read_text(encoding="utf-8")
    manifest = json.loads(text)
    if value == "huge":
        manifest[key] = [1] * len(manifest["labels"])
        text = json.dumps(manifest).replace('"thresholds": [1,', '"thresholds": [1' + "0" * 400 + ",")
    elif value == "nan":
        manifest[key] = [float("nan")] * len(manifest["labels"])
        text = json.dumps(manifest)
    elif value == "1e400":
        text = json.dumps({**manifest, key: 0.5}).replace(f'"{key}": 0.5', f'"{key}": 1' + "0" * 400)
    else:
        text = json.dumps({**manifest, key: value})
    (bundle / "bundle.json").write_text(text, encoding="utf-8")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name in ("encoder.onnx", "head.onnx", "tokenizer.json", "bundle.json"):
            tar.add(bundle / name, arcname=name)
    admin = runner.invoke(args=["tokens", "create", "root", "--role", "admin"]).output.strip().splitlines()[-1]
    before = client.get("/api/v1/models").get_json()
    response = client.post("/api/v1/models", data=_upload(raw.getvalue()), headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 422 and message in response.get_json()["error"], response.get_json()
    assert client.get("/api/v1/models").get_json() == before
