"""The model registry (import, list, activate, roll back) and each worker's live models.

The database holds every bundle (content-addressed by the sha256 of its deterministic ``.tar.gz``) and which
version of each taxonomy is active. Each worker process runs one watcher thread that polls the active
versions, loads a changed one off the request path (local disk cache first, the database blob otherwise),
validates it and then swaps a single dict reference; requests keep whatever model they already grabbed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from flask import Flask, current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..curation.corrections import CorrectionError, check_label
from ..extensions import db
from ..models import ActivationEvent, ModelArtifact, ModelVersion, Taxonomy, utcnow
from .bundle import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_ARCHIVE_BYTES,
    BundleError,
    Manifest,
    pack,
    read_digests,
    read_manifest,
    sha256_hex,
    unpack,
    verify_files,
)
from .inference import LoadedModel, load_and_validate

log = logging.getLogger(__name__)
EXTENSION_KEY = "papertag.live_models"


class RegistryError(LookupError):
    """An operation on the registry that cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class ImportResult:
    version: ModelVersion
    created: bool
    activated: bool


def _read_source(source: str | os.PathLike[str] | bytes) -> bytes:
    """Archive bytes from an upload, a ``.tar.gz`` path or a bundle directory."""
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if path.is_dir():
        return pack(path)
    if not path.is_file():
        raise BundleError(f"{path} is neither a bundle directory nor a .tar.gz file")
    if path.stat().st_size > MAX_ARCHIVE_BYTES:
        raise BundleError(f"{path} is {path.stat().st_size} bytes, over the {MAX_ARCHIVE_BYTES} byte limit")
    return path.read_bytes()


def _unpack(archive: bytes, target: Path, *, keep_existing: bool = False) -> Manifest:
    """:func:`unpack` within this app's MAX_BUNDLE_UNPACKED_BYTES and MAX_MANIFEST_BYTES."""
    config = current_app.config
    return unpack(
        archive,
        target,
        keep_existing=keep_existing,
        max_bytes=int(config["MAX_BUNDLE_UNPACKED_BYTES"]),
        max_manifest_bytes=int(config["MAX_MANIFEST_BYTES"]),
    )


def check_label_names(manifest: Manifest) -> None:
    """The label names a correction could write (no CSV separators or control characters, at most 200
    characters, no stray spaces): otherwise the label could be neither corrected nor renamed."""
    for i, label in enumerate(manifest.labels):
        try:
            if check_label(label) != label:
                raise CorrectionError(f"label {label[:80]!r} has leading, trailing or repeated spaces")
        except CorrectionError as exc:
            raise BundleError(f"bundle.json labels[{i}]: {exc}") from exc


def import_bundle(source: str | os.PathLike[str] | bytes, *, actor: str | None = None) -> ImportResult:
    """Validate a bundle (unpack, load, smoke-predict) and store it; the same bundle twice is one version.

    The first version of a taxonomy becomes its active version. Raises :class:`BundleError` with a message
    that says what is wrong when the bundle cannot serve.
    """
    raw = _read_source(source)
    with tempfile.TemporaryDirectory(prefix="papertag-import-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        manifest = _unpack(raw, bundle_dir)
        check_label_names(manifest)
        load_and_validate(bundle_dir, threads=1, digests=read_digests(bundle_dir))
        archive = pack(bundle_dir)  # canonical form, so equal content gives an equal address
    sha = sha256_hex(archive)
    version_id = f"{manifest.taxonomy_slug}-{sha[:10]}"
    existing = db.session.get(ModelVersion, version_id)
    if existing is not None:
        return _same_version(existing, sha)
    try:
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == manifest.taxonomy_slug))
        if taxonomy is None:
            taxonomy = Taxonomy(slug=manifest.taxonomy_slug, name=manifest.taxonomy_name)
            db.session.add(taxonomy)
        if db.session.get(ModelArtifact, sha) is None:
            db.session.add(ModelArtifact(sha256=sha, data=archive, size=len(archive)))
        version = ModelVersion(
            id=version_id,
            taxonomy=taxonomy,
            artifact_sha256=sha,
            labels=list(manifest.labels),
            thresholds=[float(t) for t in manifest.thresholds],
            manifest=asdict(manifest),
            imported_by=actor,
        )
        db.session.add(version)
        db.session.flush()
        activated = taxonomy.active_version_id is None
        if activated:
            _set_active(taxonomy, version, action="import", actor=actor)
        db.session.commit()
    except IntegrityError:
        # Another process imported the same bundle (or taxonomy) at the same moment: use theirs.
        db.session.rollback()
        existing = db.session.get(ModelVersion, version_id)
        if existing is None:
            raise
        return _same_version(existing, sha)
    log.info("imported model version %s (%d labels)", version_id, len(manifest.labels))
    return ImportResult(version, created=True, activated=activated)


def _same_version(existing: ModelVersion, sha: str) -> ImportResult:
    if existing.artifact_sha256 != sha:
        raise BundleError(f"version id {existing.id} is taken by a different artifact ({existing.artifact_sha256})")
    return ImportResult(existing, created=False, activated=False)


def _set_active(taxonomy: Taxonomy, version: ModelVersion, *, action: str, actor: str | None) -> None:
    db.session.add(
        ActivationEvent(
            taxonomy_id=taxonomy.id,
            version_id=version.id,
            previous_version_id=taxonomy.active_version_id,
            action=action,
            actor=actor,
        )
    )
    taxonomy.active_version_id = version.id
    version.activated_at = utcnow()
    version.activated_by = actor


def get_taxonomy(slug: str) -> Taxonomy:
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == slug))
    if taxonomy is None:
        raise RegistryError(f"there is no taxonomy {slug!r}")
    return taxonomy


def get_version(version_id: str) -> ModelVersion:
    version = db.session.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError(f"no model version {version_id!r} (see `flask models list`)")
    return version


def activate(version_id: str, *, actor: str | None = None) -> ModelVersion:
    """Make a version its taxonomy's active one; every worker picks it up within a few seconds."""
    version = get_version(version_id)
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.id == version.taxonomy_id).with_for_update())
    assert taxonomy is not None
    if taxonomy.active_version_id != version.id:
        _set_active(taxonomy, version, action="activate", actor=actor)
    db.session.commit()
    return version


def replaced_by(taxonomy_id: int, version_id: str) -> str | None:
    """The version that was active before ``version_id`` was last made active (by an import or an
    activation, not a rollback): what rolling back from it returns to, or None at the bottom of the stack."""
    return db.session.scalar(
        select(ActivationEvent.previous_version_id)
        .where(
            ActivationEvent.taxonomy_id == taxonomy_id,
            ActivationEvent.version_id == version_id,
            ActivationEvent.action != "rollback",
        )
        .order_by(ActivationEvent.id.desc())
        .limit(1)
    )


def rollback(slug: str, *, actor: str | None = None) -> ModelVersion:
    """Undo the activation that made the current version active, like popping a stack.

    Rolling back twice goes two activations back; the version that was imported first has nothing before it.
    """
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == slug).with_for_update())
    if taxonomy is None:
        raise RegistryError(f"no taxonomy {slug!r}")
    if taxonomy.active_version_id is None:
        raise RegistryError(f"taxonomy {slug!r} has no active version")
    previous = replaced_by(taxonomy.id, taxonomy.active_version_id)
    if previous is None:
        db.session.rollback()
        raise RegistryError(f"{taxonomy.active_version_id} has no earlier version to roll back to")
    target = get_version(previous)
    _set_active(taxonomy, target, action="rollback", actor=actor)
    db.session.commit()
    return target


def version_archive(version_id: str) -> bytes:
    """A version's bundle ``.tar.gz`` as stored (what the trainer downloads to compare against)."""
    version = get_version(version_id)
    artifact = db.session.get(ModelArtifact, version.artifact_sha256)
    assert artifact is not None
    return artifact.data


def active_archive(slug: str) -> bytes | None:
    """The active version's archive of a taxonomy, or None when it has none yet."""
    active = db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == slug))
    return version_archive(active) if active else None


def list_versions(slug: str | None = None) -> list[ModelVersion]:
    stmt = select(ModelVersion).join(Taxonomy).order_by(Taxonomy.slug, ModelVersion.created_at, ModelVersion.id)
    if slug:
        stmt = stmt.where(Taxonomy.slug == slug)
    return list(db.session.scalars(stmt))


def import_defaults(bundles_dir: str | os.PathLike[str], *, actor: str = "import-defaults") -> list[str]:
    """Import each bundle directory under ``bundles_dir`` whose taxonomy has no version yet, or whose active
    version is of an older bundle format that this release no longer serves (then the shipped one is activated in
    its place; the old version stays in the history).

    Idempotent and safe to run from several processes at once. Returns one line per directory.
    """
    root = Path(bundles_dir)
    report: list[str] = []
    if not root.is_dir():
        return [f"{root}: no default bundles directory, nothing to import"]
    for bundle_dir in sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file()):
        try:
            manifest = read_manifest(bundle_dir)
            taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == manifest.taxonomy_slug))
            has_versions = taxonomy is not None and db.session.scalar(
                select(ModelVersion.id).where(ModelVersion.taxonomy_id == taxonomy.id).limit(1)
            )
            active = db.session.get(ModelVersion, taxonomy.active_version_id) if taxonomy is not None else None
            outdated = active is not None and active.manifest.get("format_version", 1) < FORMAT_VERSION
            if has_versions and not outdated:
                report.append(f"{bundle_dir}: taxonomy {manifest.taxonomy_slug} already has versions, skipped")
                continue
            result = import_bundle(bundle_dir, actor=actor)
            if outdated and result.version.taxonomy.active_version_id != result.version.id:
                activate(result.version.id, actor=actor)
                report.append(
                    f"{bundle_dir}: imported {result.version.id} (active, replacing {active.id}, "
                    f"a format-{active.manifest.get('format_version', 1)} bundle this release does not serve)"
                )
                continue
            state = "active" if result.version.taxonomy.active_version_id == result.version.id else "inactive"
            report.append(f"{bundle_dir}: imported {result.version.id} ({state})")
        except BundleError as exc:
            db.session.rollback()
            report.append(f"{bundle_dir}: REFUSED: {exc}")
    return report or [f"{root}: no bundle directories, nothing to import"]


def load_version(version_id: str, cache_root: Path, *, threads: int) -> LoadedModel:
    """Load and validate a version: ``cache_root/<sha256>`` first, else the database blob (unpacked into the
    cache, or a temporary directory when the cache cannot be written). Raises :class:`BundleError`."""
    version = db.session.get(ModelVersion, version_id)
    if version is None:
        raise BundleError(f"version {version_id} does not exist")
    with _cache_lock(cache_root):
        return _load_cached(version, cache_root / version.artifact_sha256, threads)


@contextmanager
def _cache_lock(cache_root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the model cache (flock on its directory, so no file is left behind) while a version
    is checked, rewritten and loaded: no process deletes a copy another one is reading (after a deploy every worker
    loads the same versions at once). An unwritable cache takes no lock; :func:`_load_cached` then loads from a
    temporary directory."""
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_root, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load_cached(version: ModelVersion, cached: Path, threads: int) -> LoadedModel:
    version_id, sha = version.id, version.artifact_sha256
    if (cached / MANIFEST_FILE).is_file():
        try:
            return _validate(version, cached, threads, verify_files(cached))
        except (BundleError, OSError) as exc:
            log.warning("cached copy of %s is unusable (%s); rewriting it from the database", version_id, exc)
            shutil.rmtree(cached, ignore_errors=True)
    data = db.session.scalar(select(ModelArtifact.data).where(ModelArtifact.sha256 == sha))
    if data is None:
        raise BundleError(f"artifact {sha} of {version_id} is missing from the database")
    if sha256_hex(data) != sha:
        raise BundleError(f"artifact of {version_id} does not match its sha256 {sha}")
    try:
        _unpack(data, cached, keep_existing=True)
        digests = verify_files(cached)  # another process's copy, when it put one in place first
    except (OSError, BundleError) as exc:
        log.warning("cannot use the model cache for %s (%s); loading from a temporary directory", version_id, exc)
        with tempfile.TemporaryDirectory(prefix="papertag-model-") as tmp:
            _unpack(data, Path(tmp) / "bundle")
            # onnxruntime and tokenizers read the files fully at load, so the directory can go afterwards.
            return _validate(version, Path(tmp) / "bundle", threads, read_digests(Path(tmp) / "bundle"))
    return _validate(version, cached, threads, digests)


def _validate(version: ModelVersion, bundle_dir: Path, threads: int, digests: dict[str, str]) -> LoadedModel:
    model = load_and_validate(bundle_dir, threads=threads, digests=digests)
    if model.labels != version.labels:
        raise BundleError(f"bundle labels differ from the {len(version.labels)} registered for {version.id}")
    return model


def default_ort_threads() -> int:
    """onnxruntime threads per worker: every core this process may use. Idle threads sleep (no spinning), so a
    worker alone with a batch uses every core and busy workers share them: on 2 cores with 2 workers, batches of 64
    for one client went from 63 to 81-97 abstracts/s against one thread each, two clients' from 77-98 to 93-105, one
    abstract's p50 unchanged (README "Speed")."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class LiveModel:
    """A loaded version as one worker serves it."""

    slug: str
    taxonomy_id: int
    taxonomy_name: str
    version_id: str
    model: LoadedModel
    loaded_at: float


class LiveModels:
    """One worker's served models: ``current()`` returns an immutable snapshot ``{slug: LiveModel}``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._live: dict[str, LiveModel] = {}
        self.errors: dict[str, str] = {}
        self._failed_at: dict[str, float] = {}
        self._refresh_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.last_poll_error: str | None = None
        self.threads = int(app.config["ORT_THREADS"]) or default_ort_threads()
        self.cache_root = Path(app.config["DATA_DIR"]) / "model-cache"

    def current(self) -> dict[str, LiveModel]:
        self.ensure_started()
        return self._live

    def loaded(self) -> dict[str, str]:
        """``{slug: version id}`` of what this worker serves right now."""
        return {slug: live.version_id for slug, live in self._live.items()}

    def ensure_started(self) -> None:
        """Load the active models and start the watcher, once per process (so after a fork, never at import)."""
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            if self._pid is not None:  # forked from a process that had models: never reuse its sessions
                self._live, self.errors, self._failed_at = {}, {}, {}
            self._stop = threading.Event()
            try:
                self.refresh()
            except Exception as exc:  # the database may be down; the watcher keeps trying
                self.last_poll_error = str(exc)
                log.exception("could not load active models at start")
            self._thread = threading.Thread(target=self._watch, name="papertag-model-watcher", daemon=True)
            self._thread.start()
            self._pid = os.getpid()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._pid = None

    def _watch(self) -> None:
        interval = float(self.app.config["MODEL_POLL_SECONDS"])
        while not self._stop.wait(interval):
            try:
                self.refresh()
                self.last_poll_error = None
            except Exception as exc:
                self.last_poll_error = str(exc)
                log.warning("model watcher could not poll the database: %s", exc)

    def refresh(self) -> bool:
        """Compare with the database's active versions and swap in any changed one. True if anything changed."""
        with self._refresh_lock, self.app.app_context():
            try:
                return self._refresh()
            finally:
                db.session.remove()

    def _refresh(self) -> bool:
        rows = db.session.execute(
            select(Taxonomy.id, Taxonomy.slug, Taxonomy.name, Taxonomy.active_version_id).where(
                Taxonomy.active_version_id.is_not(None)
            )
        ).all()
        new = dict(self._live)
        changed = False
        retry_after = float(self.app.config["MODEL_RETRY_SECONDS"])
        for taxonomy_id, slug, name, version_id in rows:
            have = new.get(slug)
            if have is not None and have.version_id == version_id:
                continue
            failed = self._failed_at.get(version_id)
            if failed is not None and time.monotonic() - failed < retry_after:
                continue
            try:
                model = load_version(version_id, self.cache_root, threads=self.threads)
            except (BundleError, OSError) as exc:
                self._record_failure(version_id, str(exc))
                continue
            new[slug] = LiveModel(slug, taxonomy_id, name, version_id, model, time.time())
            self._clear_failure(version_id)
            self.errors.pop(version_id, None)
            self._failed_at.pop(version_id, None)
            changed = True
            log.info("worker %d now serves %s for %s", os.getpid(), version_id, slug)
        active_slugs = {row.slug for row in rows}
        for slug in [s for s in new if s not in active_slugs]:
            del new[slug]
            changed = True
        if changed:
            self._live = new  # the swap: one reference assignment
        return changed

    def _record_failure(self, version_id: str, message: str) -> None:
        log.error("model version %s cannot serve, keeping the previous one: %s", version_id, message)
        self.errors[version_id] = message
        self._failed_at[version_id] = time.monotonic()
        try:
            version = db.session.get(ModelVersion, version_id)
            if version is not None:
                version.status, version.validation_error = "failed", message
                db.session.commit()
        except Exception:  # reporting is best effort; the worker keeps serving either way
            db.session.rollback()
            log.exception("could not record the failure of %s", version_id)

    def _clear_failure(self, version_id: str) -> None:
        version = db.session.get(ModelVersion, version_id)
        if version is not None and version.status != "ready":
            version.status, version.validation_error = "ready", None
            db.session.commit()


def live_models() -> LiveModels:
    return current_app.extensions[EXTENSION_KEY]
