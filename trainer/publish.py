"""Publishing: read corrections from a site or its database, report progress, gate and register the bundle.

Two targets share one interface: :class:`SiteTarget` talks to a running site over its HTTP API (so a GPU box
can train for a site on Render); :class:`DatabaseTarget` opens the site's database directly.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from webapp.serving.bundle import BundleError, pack, unpack
from webapp.surgery import LabelMap

from .data import Paper
from .evaluate import evaluate_papers

log = logging.getLogger(__name__)
MAX_DRIFT = 0.01


class PublishError(RuntimeError):
    """The site or database cannot be reached, refused us, or refused the bundle."""


class Target(Protocol):
    def corrections(self, slug: str) -> list[Paper]: ...
    def label_changes(self, slug: str) -> LabelMap: ...
    def start_run(self, slug: str, config: dict[str, Any]) -> int | None: ...
    def claim(self) -> dict[str, Any] | None: ...
    def report(self, run_id: int | None, update: dict[str, Any]) -> None: ...
    def active_bundle(self, slug: str, into: Path) -> Path | None: ...
    def register(self, bundle_dir: Path) -> str: ...
    def activate(self, version: str) -> None: ...


def paper_from_annotation(line: dict[str, Any]) -> Paper:
    """One line of ``GET /api/v1/annotations``: the corrected prediction with its current labels."""
    return Paper(
        id=f"prediction-{line['id']}",
        title=line.get("title") or "",
        abstract=line["abstract"],
        labels=sorted(line["labels"]),
    )


class SiteTarget:
    """A running papertag site, reached with an admin API token."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        if not token:
            raise PublishError("publishing to a site needs an admin API token (--token or PAPERTAG_TOKEN)")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.http.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise PublishError(f"cannot reach {self.url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise PublishError(f"{self.url} refused the token (HTTP {response.status_code}): {_error_of(response)}")
        if response.status_code >= 400:
            raise PublishError(f"{method} {path} failed with HTTP {response.status_code}: {_error_of(response)}")
        return response

    def corrections(self, slug: str) -> list[Paper]:
        response = self._call("GET", "/api/v1/annotations", params={"taxonomy": slug}, stream=True)
        return [paper_from_annotation(json.loads(line)) for line in response.iter_lines() if line.strip()]

    def label_changes(self, slug: str) -> LabelMap:
        """The taxonomy's renames, merges and splits (none for a taxonomy the site does not know yet)."""
        taxonomies = self._call("GET", "/api/v1/taxonomies").json()["taxonomies"]
        if slug not in {t["slug"] for t in taxonomies}:
            return LabelMap()
        return LabelMap.from_json(self._call("GET", f"/api/v1/taxonomies/{slug}/label-changes").json()["rules"])

    def start_run(self, slug: str, config: dict[str, Any]) -> int | None:
        return int(self._call("POST", "/api/v1/training-runs", json={"taxonomy": slug, "config": config}).json()["id"])

    def claim(self) -> dict[str, Any] | None:
        response = self._call("POST", "/api/v1/training-runs/claim")
        return None if response.status_code == 204 else response.json()

    def report(self, run_id: int | None, update: dict[str, Any]) -> None:
        if run_id is None:
            return
        try:
            self._call("PATCH", f"/api/v1/training-runs/{run_id}", json=update)
        except PublishError as exc:  # progress is informative; losing one update must not stop training
            log.warning("progress update not recorded: %s", exc)

    def active_bundle(self, slug: str, into: Path) -> Path | None:
        taxonomies = self._call("GET", "/api/v1/taxonomies").json()["taxonomies"]
        active = next((t.get("active_version") for t in taxonomies if t["slug"] == slug), None)
        if not active:
            return None
        archive = self._call("GET", f"/api/v1/models/{active}/bundle").content
        unpack(archive, into)
        return into

    def register(self, bundle_dir: Path) -> str:
        files = {"bundle": (f"{bundle_dir.name}.tar.gz", pack(bundle_dir), "application/gzip")}
        return self._call("POST", "/api/v1/models", files=files).json()["id"]

    def activate(self, version: str) -> None:
        self._call("POST", f"/api/v1/models/{version}/activate")


class DatabaseTarget:
    """The site's database, opened with the web app's own models and registry (no HTTP in between)."""

    def __init__(self, database_url: str) -> None:
        from webapp import create_app

        # The trainer signs nothing; a throwaway key satisfies the production check.
        self.app = create_app(
            {
                "DATABASE_URL": database_url,
                "SQLALCHEMY_DATABASE_URI": _sqlalchemy_uri(database_url),
                "SECRET_KEY": secrets.token_hex(16),
            }
        )
        try:
            with self.app.app_context():
                from webapp.extensions import db

                db.session.execute(db.text("SELECT 1"))
        except Exception as exc:  # any driver error means the same thing here
            raise PublishError(f"cannot open database {database_url.split('@')[-1]}: {exc}") from exc

    @contextmanager
    def _context(self) -> Iterator[None]:
        with self.app.app_context():
            yield

    def corrections(self, slug: str) -> list[Paper]:
        from webapp.curation.annotations import corrected_predictions

        with self._context():
            return [paper_from_annotation(line) for line in corrected_predictions(slug)]

    def label_changes(self, slug: str) -> LabelMap:
        from webapp.curation.annotations import label_map
        from webapp.extensions import db
        from webapp.models import Taxonomy

        with self._context():
            taxonomy_id = db.session.scalar(db.select(Taxonomy.id).where(Taxonomy.slug == slug))
            return label_map(taxonomy_id) if taxonomy_id is not None else LabelMap()

    def start_run(self, slug: str, config: dict[str, Any]) -> int | None:
        from webapp.training_runs import create_run

        with self._context():
            return create_run(slug, config, requested_by="trainer-cli").id

    def claim(self) -> dict[str, Any] | None:
        from webapp.training_runs import claim_next, run_json

        with self._context():
            run = claim_next(worker=f"trainer@{socket.gethostname()}")
            return run_json(run) if run else None

    def report(self, run_id: int | None, update: dict[str, Any]) -> None:
        from webapp.training_runs import update_run

        if run_id is not None:
            with self._context():
                update_run(run_id, update)

    def active_bundle(self, slug: str, into: Path) -> Path | None:
        from webapp.serving.registry import active_archive

        with self._context():
            archive = active_archive(slug)
        if archive is None:
            return None
        unpack(archive, into)
        return into

    def register(self, bundle_dir: Path) -> str:
        from webapp.serving.registry import import_bundle

        with self._context():
            try:
                return import_bundle(bundle_dir, actor="trainer").version.id
            except BundleError as exc:
                raise PublishError(f"the database refused the bundle: {exc}") from exc

    def activate(self, version: str) -> None:
        from webapp.serving.registry import activate

        with self._context():
            activate(version, actor="trainer")


def _sqlalchemy_uri(url: str) -> str:
    from webapp.config import database_uri

    return database_uri(url, ".")


def _error_of(response: requests.Response) -> str:
    try:
        return str(response.json().get("error") or response.text[:200])
    except ValueError:
        return response.text[:200] or response.reason


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    candidate_micro_f1: float
    active_micro_f1: float | None
    drift: float


def promotion_gate(candidate: Path, active: Path | None, test_papers: list[Paper], drift: float) -> GateResult:
    """Promote only if micro-F1 on the frozen test split is not below the active model's on the same papers
    (each scored through the server's inference code) and the int8 graphs' mean absolute probability difference
    from fp32 is within ``MAX_DRIFT``."""
    candidate_f1 = evaluate_papers(candidate, test_papers)["micro_f1"]
    active_f1 = evaluate_papers(active, test_papers)["micro_f1"] if active else None
    if drift > MAX_DRIFT:
        return GateResult(False, f"int8 drift {drift:.4f} exceeds {MAX_DRIFT}", candidate_f1, active_f1, drift)
    if active_f1 is not None and candidate_f1 < active_f1:
        reason = f"test micro-F1 {candidate_f1:.4f} is below the active model's {active_f1:.4f}"
        return GateResult(False, reason, candidate_f1, active_f1, drift)
    return GateResult(True, "passed", candidate_f1, active_f1, drift)


def publish(
    target: Target,
    bundle_dir: Path,
    test_papers: list[Paper],
    *,
    force: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Register the bundle; activate it when it passes the gate (or ``force``). Returns what happened;
    ``progress`` hears the gate and publish phases (the training run's page shows them)."""
    report = progress or (lambda update: None)
    from webapp.serving.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    # The mean probability moved by int8, not the micro-F1 difference: on a small test split that counts a few
    # threshold flips and is mostly noise.
    drift = float(manifest.metrics.get("drift", {}).get("fp32_vs_int8_mean_abs_probability", 0.0))
    report({"status": "running", "phase": "gate", "stage": "scoring the frozen test papers with both models"})
    with tempfile.TemporaryDirectory(prefix="papertag-active-") as scratch:
        active = target.active_bundle(manifest.taxonomy_slug, Path(scratch) / "active")
        gate = promotion_gate(bundle_dir, active, test_papers, drift)
    report({"status": "running", "phase": "publish", "stage": "registering the version"})
    version = target.register(bundle_dir)
    activated = gate.passed or force
    if activated:
        target.activate(version)
    log.info(
        "published %s: gate %s (%s)%s",
        version,
        "passed" if gate.passed else "failed",
        gate.reason,
        ", activated" if activated else ", not activated",
    )
    return {"version": version, "activated": activated, "gate": gate.__dict__}
