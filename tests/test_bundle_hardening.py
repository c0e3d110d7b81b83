"""Issue 11, points 2, 3, 4 and 6: bundle archives unpack within bounds, manifests are validated field by field,
the smoke test catches models that break on long texts, one broken taxonomy never takes the others down, and a
cached model file that changed on disk is rewritten from the database before it serves."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from flask import Flask
from sqlalchemy import func, select

from tests.conftest import BundleFactory, job_engine_of, live_models_of, make_app
from tests.test_auth import _token as api_token
from tests.test_batch import make_csv
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.jobs.batch import create_job, parse_csv, queue_job
from webapp.models import BatchJob, BatchRow, ModelVersion, Prediction, PredictionResult
from webapp.serving.bundle import BUNDLE_FILES, MANIFEST_FILE, BundleError, unpack
from webapp.serving.inference import LoadedModel
from webapp.serving.registry import import_bundle

GiB = 1024**3
TEXT = "We detect objects in images with a convolutional network and report its mean average precision."


@pytest.fixture
def fresh_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """``fresh_app(**config)`` -> a migrated app on ``tmp_path/data`` (stopped after the test)."""
    apps: list[Flask] = []

    def factory(**overrides: object) -> Flask:
        apps.append(make_app(tmp_path / "data", **overrides))
        return apps[-1]

    yield factory
    for app in apps:
        stop(app)


def stop(app: Flask) -> None:
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()


def bundle_files(bundle_dir: Path) -> dict[str, bytes]:
    return {name: (bundle_dir / name).read_bytes() for name in BUNDLE_FILES}


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes]], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """A .tar.gz of exactly these members (headers as given, so hostile ones too)."""
    raw = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tar_format) as tar,
    ):
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def archive_of(files: dict[str, bytes]) -> bytes:
    return tar_gz([member(name, data) for name, data in files.items()])


def with_manifest(bundle_dir: Path, text: str) -> bytes:
    """The bundle's archive with ``bundle.json`` replaced by ``text`` as is (pack() would refuse it)."""
    return archive_of(bundle_files(bundle_dir) | {MANIFEST_FILE: text.encode("utf-8")})


def upload(app: Flask, archive: bytes) -> tuple[int, dict[str, Any]]:
    response = app.test_client().post(
        "/api/v1/models",
        data=archive,
        headers={**api_token(app, "ada", "admin"), "Content-Type": "application/gzip"},
    )
    return response.status_code, response.get_json()


def versions(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count(ModelVersion.id)))


# -- point 2: bounded unpacking ---------------------------------------------------------------------------------------


def test_an_archive_of_the_folder_made_with_tar_dot_is_the_same_bundle(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """`tar czf bundle.tar.gz -C DIR .` names the folder "./" and every file "./<name>"; anything else in the
    folder is still refused."""
    bundle_dir = make_bundle(seed=2)
    folder = tarfile.TarInfo("./")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    files = [member(f"./{name}", data) for name, data in bundle_files(bundle_dir).items()]
    app = fresh_app()
    status, body = upload(app, tar_gz([(folder, b""), *files]))
    assert status == 201, body
    assert versions(app) == 1
    status, body = upload(app, tar_gz([(folder, b""), *files, member("./notes.txt", b"mine")]))
    assert status == 422 and "unexpected entry './notes.txt'" in body["error"]


def test_a_gzip_bomb_stops_at_the_unpacked_cap(fresh_app: Callable[..., Flask], make_bundle: BundleFactory) -> None:
    app = fresh_app(MAX_BUNDLE_UNPACKED_BYTES=1024 * 1024)
    files = bundle_files(make_bundle(seed=1)) | {"encoder.onnx": bytes(8 * 1024 * 1024)}
    bomb = archive_of(files)
    assert len(bomb) < 64 * 1024  # 8 MiB of zeros, a few KB compressed
    status, body = upload(app, bomb)
    assert status == 422, body
    assert "unpacks to more than 1048576 bytes" in body["error"]
    assert versions(app) == 0


def test_members_are_summed_against_the_cap_before_extraction(make_bundle: BundleFactory, tmp_path: Path) -> None:
    files = bundle_files(make_bundle(seed=1))
    largest = max(len(data) for data in files.values())
    with pytest.raises(BundleError, match="unpacks to more than"):
        unpack(archive_of(files), tmp_path / "bundle", max_bytes=largest + 1)
    assert not (tmp_path / "bundle").exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too


def gnu_sparse(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member: 512 bytes of data mapped at offset 0 of a ``real_size`` byte file."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # first map entry: offset
    header[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)  # ... and its length
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # the real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"x" * 512


def pax_sparse(name: str, real_size: int) -> bytes:
    """A GNU sparse 1.0 member in a PAX archive (what `tar --sparse --format=posix` writes)."""
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(real_size),
    }
    data = b"1\n0\n512\n".ljust(512, b"\0") + b"x" * 512
    info.size = len(data)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
        return raw.getvalue()  # before close() writes the end-of-archive blocks


@pytest.mark.parametrize("sparse", [gnu_sparse, pax_sparse])
def test_a_64_gib_sparse_member_is_refused(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, sparse: Callable[[str, int], bytes]
) -> None:
    app = fresh_app()
    files = bundle_files(make_bundle(seed=1))
    plain = tar_gz([member(n, d) for n, d in files.items() if n != "encoder.onnx"])
    # The hostile member first, then the other files and the end of the archive.
    tar = sparse("encoder.onnx", 64 * GiB) + gzip.decompress(plain)
    status, body = upload(app, gzip.compress(tar, mtime=0))
    assert status == 422, body
    assert "sparse" in body["error"]
    assert versions(app) == 0


def test_an_oversized_bundle_json_is_refused(fresh_app: Callable[..., Flask], make_bundle: BundleFactory) -> None:
    app = fresh_app()
    bundle_dir = make_bundle(seed=1)
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["metrics"] = {f"junk{i}": "x" * 1000 for i in range(2000)}  # 2 MB, 129 KB compressed or so
    status, body = upload(app, with_manifest(bundle_dir, json.dumps(manifest)))
    assert status == 422, body
    assert "bundle.json is" in body["error"] and "over the 1048576 byte limit" in body["error"]
    assert versions(app) == 0


# -- point 3: the manifest's schema ----------------------------------------------------------------------------------


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


MANIFEST_CASES = [
    ("metrics", [1, 2], "metrics: must be a JSON object"),
    ("metrics", deep(20), "metrics: nests deeper than"),
    ("metrics", {f"k{i}": list(range(40)) for i in range(4000)}, "metrics: takes"),
    ("training_data", "many", "training_data: must be a JSON object"),
    ("taxonomy_name", 5, "taxonomy_name: must be a string"),
    ("taxonomy_name", "tasks\x07", "taxonomy_name: contains a control character"),
    ("base_model", 5, "base_model: must be a string"),
    ("created_at", ["today"], "created_at: must be a string"),
    ("encoder_sha256", 5, "encoder_sha256: must be a string"),
    ("labels", "abc", "labels: must be a list"),
    ("labels", ["a;b|c", *[f"label {i}" for i in range(7)]], "labels[0]: label 'a;b|c' contains | or ;"),
    ("labels", ["ok", "x" * 201, *[f"label {i}" for i in range(6)]], "labels[1]: a label is 201 characters"),
    ("labels", ["twice", "twice", *[f"label {i}" for i in range(6)]], "labels[1]: labels are not unique"),
    ("labels", ["", *[f"label {i}" for i in range(7)]], "labels[0]: every label must be a non-empty string"),
    ("labels", [" padded", *[f"label {i}" for i in range(7)]], "labels[0]: label ' padded' has leading"),
    ("thresholds", [1.5] * 8, "thresholds[0]: every threshold"),
    ("thresholds", [0.5] * 7, "thresholds: 7 thresholds for 8 labels"),
    ("thresholds", "0.5", "thresholds: must be a list"),
]


@pytest.mark.parametrize(("field", "value", "message"), MANIFEST_CASES, ids=[c[2][:40] for c in MANIFEST_CASES])
def test_every_manifest_violation_is_a_422_naming_the_field(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, field: str, value: Any, message: str
) -> None:
    app = fresh_app()
    bundle_dir = make_bundle(seed=1)
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text()) | {field: value}
    status, body = upload(app, with_manifest(bundle_dir, json.dumps(manifest)))
    assert status == 422, body
    assert body["error"].startswith(f"bundle refused: bundle.json {message}"), body["error"]
    assert versions(app) == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace('"thresholds": [', '"thresholds": [NaN, ', 1), "NaN is not a JSON number"),
        (lambda text: text.replace('"metrics": {', '"metrics": {"x": ' + "[" * 100_000, 1), "nests too deeply"),
        (lambda text: text.replace('"metrics": {', '"metrics": {"x": ' + "9" * 5000 + ", ", 1), "4300 digits"),
    ],
    ids=["nan", "deep", "5000-digit-integer"],
)
def test_json_that_python_reads_but_json_forbids_is_refused(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, edit: Callable[[str], str], message: str
) -> None:
    app = fresh_app()
    bundle_dir = make_bundle(seed=1)
    status, body = upload(app, with_manifest(bundle_dir, edit((bundle_dir / MANIFEST_FILE).read_text())))
    assert status == 422 and message in body["error"], body


def test_the_cli_refuses_a_bad_manifest_with_the_field(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, tmp_path: Path
) -> None:
    app = fresh_app()
    bundle_dir = make_bundle(seed=1)
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text()) | {"metrics": [1, 2]}
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(with_manifest(bundle_dir, json.dumps(manifest)))
    result = app.test_cli_runner().invoke(args=["models", "import", str(path)])
    assert result.exit_code != 0
    assert "bundle refused: bundle.json metrics: must be a JSON object, not list" in result.output
    assert versions(app) == 0


@pytest.mark.parametrize(
    "manifest_metrics",
    [[1, 2], "junk", {"test": [1], "newest": {"micro_f1": 0.5, "macro_f1": "x"}, "baseline": {"newest": 3}}],
)
def test_pages_survive_a_malformed_stored_manifest(app: Flask, admin_client: Any, manifest_metrics: Any) -> None:
    """Rows stored before manifests were validated: every page that lists versions still answers."""
    with app.app_context():
        active = db.session.scalar(select(ModelVersion))
        db.session.add(
            ModelVersion(
                id="test-tasks-malformed",
                taxonomy_id=active.taxonomy_id,
                artifact_sha256=active.artifact_sha256,
                labels=list(active.labels),
                thresholds=list(active.thresholds),
                manifest=dict(active.manifest) | {"metrics": manifest_metrics, "training_data": [3]},
            )
        )
        db.session.commit()
    for url in ("/models", "/api/v1/models", "/api/v1/taxonomies"):
        response = admin_client.get(url)
        assert response.status_code == 200, (url, response.get_data(as_text=True)[:500])
    assert "test-tasks-malformed" in admin_client.get("/api/v1/models").get_data(as_text=True)
    listing = app.test_cli_runner().invoke(args=["models", "list"])
    assert listing.exit_code == 0 and "test-tasks-malformed" in listing.output, listing.output


# -- point 4: smoke tests, and one broken taxonomy never takes the others down ----------------------------------------


@pytest.mark.parametrize(
    ("max_length", "nan_after"),
    [(128, 40), (2048, 1024)],
    ids=["nan-past-40-tokens", "nan-past-1024-of-2048"],
)
def test_a_model_that_turns_nan_on_long_texts_is_refused_at_import(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory, max_length: int, nan_after: int
) -> None:
    app = fresh_app()
    bundle_dir = make_bundle(seed=1, max_length=max_length, encoder_nan_after=nan_after)
    status, body = upload(app, archive_of(bundle_files(bundle_dir)))
    assert status == 422, body
    assert "smoke prediction returned non-finite scores" in body["error"]
    assert versions(app) == 0


def test_a_pooled_vector_too_large_to_store_is_refused(
    fresh_app: Callable[..., Flask], make_bundle: BundleFactory
) -> None:
    """Its normalised copy is stored with every prediction: 4097 floats would be over the 16 KiB bound."""
    app = fresh_app()
    status, body = upload(app, archive_of(bundle_files(make_bundle(seed=1, hidden=4097))))
    assert status == 422, body
    assert "pooled vector has shape (4097,); at most 4096 values are stored" in body["error"]
    assert versions(app) == 0


def test_the_smoke_texts_fill_every_window(make_bundle: BundleFactory) -> None:
    model = LoadedModel(make_bundle(seed=1, max_windows=3))
    lengths = [reading.total_tokens for reading in model.encoder.run(model.smoke_texts())]
    assert min(lengths) < model.encoder.content // 2
    assert any(length >= model.encoder.content for length in lengths)
    assert max(lengths) > model.manifest.read_tokens  # the last window is full and text is left over


@pytest.fixture
def two_taxonomies(app: Flask, make_bundle: BundleFactory) -> Flask:
    """``app`` serving test-tasks and test-topics (one shared encoder, two heads)."""
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug="test-topics", name="Test topics", labels=["Vision", "Language"]))
    live_models_of(app).refresh()
    assert sorted(live_models_of(app).current()) == ["test-tasks", "test-topics"]
    return app


def break_head(monkeypatch: pytest.MonkeyPatch, app: Flask, slug: str, how: str) -> None:
    """Make one live taxonomy's head answer NaN, or raise, from now on."""
    model = live_models_of(app).current()[slug].model

    def broken(texts: list[str], readings: list) -> tuple[np.ndarray, np.ndarray]:
        if how == "raises":
            raise RuntimeError("onnxruntime: the head exploded")
        return np.full((len(texts), len(model.labels)), np.nan, np.float32), np.zeros(len(texts), np.float32)

    monkeypatch.setattr(model, "head_outputs", broken)


@pytest.mark.parametrize("how", ["nan", "raises"])
def test_one_broken_taxonomy_is_reported_and_the_others_answer(
    two_taxonomies: Flask, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    app = two_taxonomies
    break_head(monkeypatch, app, "test-topics", how)
    client = app.test_client()
    response = client.post("/api/v1/predict", json={"abstracts": [{"title": "Boxes", "abstract": TEXT}] * 2})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert [sorted(p["results"]) for p in body["predictions"]] == [["test-tasks"], ["test-tasks"]]
    assert list(body["errors"]) == ["test-topics"]
    with app.app_context():
        stored = db.session.scalars(select(PredictionResult.prediction_id)).all()
        assert sorted(stored) == sorted(p["id"] for p in body["predictions"])
    # The web form stores the working taxonomy's answer and says which one failed.
    page = client.post("/", data={"title": "Boxes", "abstract": TEXT}, follow_redirects=True)
    assert page.status_code == 200
    assert "The test-topics model could not answer this abstract" in page.get_data(as_text=True)


def test_every_taxonomy_broken_is_a_503_and_stores_nothing(
    two_taxonomies: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = two_taxonomies
    break_head(monkeypatch, app, "test-topics", "nan")
    break_head(monkeypatch, app, "test-tasks", "raises")
    response = app.test_client().post("/api/v1/predict", json={"title": "Boxes", "abstract": TEXT})
    assert response.status_code == 503
    assert "test-tasks: RuntimeError" in response.get_json()["error"]
    assert "test-topics: BundleError: the model answered non-finite scores" in response.get_json()["error"]
    with app.app_context():
        assert db.session.scalar(select(func.count(Prediction.id))) == 0


def test_a_batch_goes_on_when_one_taxonomy_breaks(
    two_taxonomies: Flask, monkeypatch: pytest.MonkeyPatch, abstracts: list[dict]
) -> None:
    app = two_taxonomies
    break_head(monkeypatch, app, "test-topics", "raises")
    rows = [[a["title"], a["abstract"]] for a in abstracts[:10]]
    with app.app_context():
        app.config["BATCH_CHUNK_SIZE"] = 4
        parsed = parse_csv(make_csv([["title", "abstract"], *rows]).decode(), 5000)
        job_id = create_job("b.csv", parsed, created_by="tests").id
        assert queue_job(job_id) == 3
        assert job_engine_of(app).run_pending() == 3
        job = db.session.get(BatchJob, job_id)
        assert (job.status, job.processed) == ("finished", 10), job.error
        linked = select(func.count(BatchRow.id)).where(BatchRow.job_id == job_id, BatchRow.prediction_id.is_not(None))
        assert db.session.scalar(linked) == 10
        slugs = {r.taxonomy.slug for r in db.session.scalars(select(PredictionResult))}
        assert slugs == {"test-tasks"}


# -- point 6: cached model files are verified ---------------------------------------------------------------------


def overwrite_tensor(path: Path, tensor: str) -> None:
    """Random weights over one tensor (finite, so the smoke test cannot notice): the file stays valid ONNX and the
    model answers differently."""
    model = onnx.load(str(path))
    (initializer,) = [i for i in model.graph.initializer if i.name == tensor]
    raw = bytes(initializer.raw_data)
    data = path.read_bytes()
    at = data.index(raw)
    noise = np.random.default_rng(7).normal(0, 3, len(raw) // 4).astype(np.float32).tobytes()
    path.write_bytes(data[:at] + noise + data[at + len(raw) :])
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.parametrize(("name", "tensor"), [("head.onnx", "W"), ("encoder.onnx", "E")])
def test_a_tampered_cached_file_is_rewritten_from_the_database(
    tmp_path: Path, make_bundle: BundleFactory, name: str, tensor: str, capfd: pytest.CaptureFixture[str]
) -> None:
    first = make_app(tmp_path / "data")
    try:
        with first.app_context():
            import_bundle(make_bundle(seed=1))
        before = first.test_client().post("/api/v1/predict", json={"abstract": TEXT}).get_json()
    finally:
        stop(first)
    (cached,) = [path for path in (tmp_path / "data" / "model-cache").iterdir() if path.is_dir()]
    original = (cached / name).read_bytes()
    overwrite_tensor(cached / name, tensor)

    restarted = make_app(tmp_path / "data")  # a restart: a new process on the same DATA_DIR
    try:
        after = restarted.test_client().post("/api/v1/predict", json={"abstract": TEXT}).get_json()
    finally:
        stop(restarted)
    scores = [p["results"]["test-tasks"]["scores"] for p in (before["predictions"][0], after["predictions"][0])]
    assert scores[0] == scores[1]
    assert (cached / name).read_bytes() == original
    # The migrations' logging config replaces pytest's log handler, so the warning is read where it is printed.
    assert f"{name} does not match the sha256 recorded from the artifact" in capfd.readouterr().err


def test_a_cache_without_recorded_digests_is_rewritten(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """Caches written before digests were recorded are not trusted either."""
    first = make_app(tmp_path / "data")
    with first.app_context():
        import_bundle(make_bundle(seed=1))
    live_models_of(first).current()
    stop(first)
    (cached,) = [path for path in (tmp_path / "data" / "model-cache").iterdir() if path.is_dir()]
    (cached / "sha256.json").unlink()
    restarted = make_app(tmp_path / "data")
    try:
        assert live_models_of(restarted).current()["test-tasks"].model.labels
    finally:
        stop(restarted)
    assert (cached / "sha256.json").is_file()
