"""Thresholds that learn (issue 6): re-tune the active version's per-label thresholds from its reviewed
predictions and offer the result as a new version that differs only in ``bundle.json`` (same ``encoder.onnx``,
``head.onnx`` and ``tokenizer.json``), through the registry's import, the promotion gate and the usual hot swap.

Only reviews of the active version count: their stored scores are that model's. A label is re-tuned (max F1 on
:data:`webapp.quality.tuning.GRID`) when it has at least ``THRESHOLD_MIN_EVIDENCE`` reviewed positives; the others keep
the trained threshold. The gate is the trainer's rule (never worse than the active model, int8 drift within its
limit; the graph is the same, so the drift is 0): both thresholds are scored on reviews held out from their
tuning, by a 2-fold cross-fit on a hash of the prediction id, so no review scores thresholds fitted on it.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user

from ..access.auth import has_role, role_required, token_user_role
from ..api import json_body
from ..curation.annotations import label_map
from ..extensions import db
from ..models import ModelVersion
from ..serving.bundle import MANIFEST_FILE, BundleError, unpack
from ..serving.registry import RegistryError, get_taxonomy, get_version, import_bundle, version_archive
from .live import Review, reviews
from .tuning import f1_score, label_thresholds, micro_counts, micro_f1

bp = Blueprint("learned", __name__)
api_bp = Blueprint("learned_api", __name__, url_prefix="/api/v1")

FOLDS = 2


class LearnError(ValueError):
    """Nothing to learn (no active version, too little evidence, no threshold moves); the message says why."""


@dataclass(frozen=True)
class Learned:
    version: ModelVersion
    created: bool

    @property
    def report(self) -> dict[str, Any]:
        return self.version.metrics["learned_thresholds"]


def fold_of(prediction_id: int) -> int:
    """A review's fold: stable across runs and processes (Python's own hash of a str is not)."""
    return int(hashlib.sha256(str(prediction_id).encode()).hexdigest(), 16) % FOLDS


def held_out_f1(
    probabilities: np.ndarray, targets: np.ndarray, folds: np.ndarray, min_evidence: int, trained: list[float]
) -> float:
    """Micro-F1 of learned thresholds with every review scored by thresholds tuned on the other fold."""
    totals = np.zeros(3)
    for fold in range(FOLDS):
        fit, held = folds != fold, folds == fold
        thresholds = label_thresholds(probabilities[fit], targets[fit], min_evidence, trained)
        totals += micro_counts(probabilities[held], targets[held], thresholds)
    return float(f1_score(*totals))


def gate(learned_f1: float, trained_f1: float) -> dict[str, Any]:
    """The promotion gate's verdict, shaped like the trainer's ``GateResult``."""
    passed = learned_f1 >= trained_f1
    reason = (
        "passed" if passed else f"held-out micro-F1 {learned_f1:.4f} is below the trained thresholds' {trained_f1:.4f}"
    )
    return {
        "passed": passed,
        "reason": reason,
        "candidate_micro_f1": round(learned_f1, 4),
        "active_micro_f1": round(trained_f1, 4),
        "drift": 0.0,
    }


def learn(slug: str, *, min_evidence: int, actor: str) -> Learned:
    """Learn thresholds for ``slug``'s active version from its reviews and import them as a new, inactive
    version. The same reviews give the same bundle, so learning twice is one version."""
    taxonomy = get_taxonomy(slug)
    if taxonomy.active_version_id is None:
        raise LearnError(f"{slug} has no active version to learn thresholds for")
    parent = get_version(taxonomy.active_version_id)
    items = reviews(taxonomy.id, parent.id, with_scores=True)
    labels, trained = list(parent.labels), [float(t) for t in parent.thresholds]
    probabilities = np.array([[item.scores.get(label, 0.0) for label in labels] for item in items]).reshape(
        -1, len(labels)
    )
    # Gold is in today's label names: an output label is a positive when what it reads as now was kept or added.
    labels_map = label_map(taxonomy.id)
    targets = np.array(
        [[bool(labels_map.map_label(label, item.text) & item.gold) for label in labels] for item in items], dtype=bool
    ).reshape(-1, len(labels))
    evidence = targets.sum(axis=0)
    if not items or evidence.max() < min_evidence:
        raise LearnError(
            f"not enough evidence: a label needs {min_evidence} reviewed positives to be re-tuned; in the "
            f"{len(items)} reviewed predictions of {parent.id} the most any label has is {int(evidence.max(initial=0))}"
        )
    learned = label_thresholds(probabilities, targets, min_evidence, trained)
    changed = [j for j in range(len(labels)) if abs(learned[j] - trained[j]) > 1e-9]
    if not changed:
        raise LearnError(
            f"the reviews move no threshold: every label with {min_evidence} or more reviewed positives "
            f"is already best at its trained threshold ({len(items)} reviewed predictions of {parent.id})"
        )
    folds = np.array([fold_of(item.prediction_id) for item in items])
    learned_f1 = held_out_f1(probabilities, targets, folds, min_evidence, trained)
    trained_f1 = micro_f1(probabilities, targets, trained)
    report = {
        "derived_from": parent.id,
        "min_evidence": min_evidence,
        "reviewed": len(items),
        "reviewed_until": _reviewed_until(items),
        "folds": FOLDS,
        "changed": [
            {"label": labels[j], "old": trained[j], "new": learned[j], "positives": int(evidence[j])} for j in changed
        ],
        "held_out": {"trained_micro_f1": round(trained_f1, 4), "learned_micro_f1": round(learned_f1, 4)},
        "gate": gate(learned_f1, trained_f1),
    }
    with tempfile.TemporaryDirectory(prefix="papertag-learn-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        manifest = unpack(version_archive(parent.id), bundle_dir)
        manifest.thresholds = learned
        # The newest review learned from, not the clock: the same reviews must give the same bundle.
        manifest.created_at = report["reviewed_until"]
        metrics: dict[str, Any] = {"learned_thresholds": report}
        if "drift" in manifest.metrics:  # the same graph, so the same int8 drift
            metrics["drift"] = manifest.metrics["drift"]
        manifest.metrics = metrics
        (bundle_dir / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        result = import_bundle(bundle_dir, actor=actor)
    return Learned(result.version, result.created)


def _reviewed_until(items: list[Review]) -> str:
    return max(item.reviewed_at for item in items).isoformat() + "Z"


def learned_version(slug: str, version_id: str) -> ModelVersion:
    """A version of ``slug`` made by :func:`learn` (404 otherwise)."""
    version = get_version(version_id)
    if version.taxonomy.slug != slug or "learned_thresholds" not in version.metrics:
        raise RegistryError(f"{version_id} is not a version of {slug} with thresholds learned from reviews")
    return version


def learned_json(result: Learned) -> dict[str, Any]:
    version = result.version
    return {
        "version": version.id,
        "taxonomy": version.taxonomy.slug,
        "created": result.created,
        "active": version.taxonomy.active_version_id == version.id,
        **result.report,
    }


@bp.post("/models/<slug>/thresholds")
@role_required("admin")
def learn_from_reviews(slug: str) -> Response:
    try:
        result = learn(slug, min_evidence=current_app.config["THRESHOLD_MIN_EVIDENCE"], actor=current_user.name)
    except (LearnError, BundleError) as exc:
        db.session.rollback()
        flash(f"No thresholds learned: {exc}.", "error")
        return redirect(url_for("quality.page", slug=slug))
    changed = len(result.report["changed"])
    if result.created:
        flash(f"Learned new thresholds for {changed} label{'s' if changed != 1 else ''}: {result.version.id}.", "ok")
    else:
        flash(f"These reviews were learned from before: {result.version.id}.", "ok")
    return redirect(url_for("learned.result", slug=slug, version_id=result.version.id))


@bp.get("/models/<slug>/thresholds/<version_id>")
def result(slug: str, version_id: str) -> str:
    version = learned_version(slug, version_id)
    report = version.metrics["learned_thresholds"]
    active = version.taxonomy.active_version_id
    return render_template(
        "quality/learned.html",
        version=version,
        report=report,
        is_active=active == version.id,
        # The gate compared with the version it was derived from; once another is active the verdict is stale.
        can_activate=has_role(current_user, "admin")
        and active == report["derived_from"]
        and report["gate"]["passed"]
        and version.status == "ready",
    )


def _min_evidence(body: Any) -> int:
    """``{"min_evidence": N}`` (optional) -> N; anything else is a 400."""
    default = int(current_app.config["THRESHOLD_MIN_EVIDENCE"])
    if body is None:
        return default
    if not isinstance(body, dict):
        abort(400, description='send an object: {"min_evidence": N} (optional)')
    unknown = sorted(set(body) - {"min_evidence"})
    if unknown:
        abort(400, description=f"unknown fields: {', '.join(unknown)} (only min_evidence is accepted)")
    value = body.get("min_evidence", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        abort(400, description=f"min_evidence must be a whole number from 1 to 1000000, not {value!r}")
    return value


@api_bp.post("/taxonomies/<slug>/thresholds")
@token_user_role("admin")
def learn_api(slug: str) -> tuple[Response, int]:
    """Learn thresholds from the active version's reviews (optional body ``{"min_evidence": N}``): 201 with the
    new version and the gate's verdict, 200 when these reviews were learned before, 422 when there is nothing
    to learn (nothing is created then)."""
    min_evidence = _min_evidence(json_body() if request.get_data() else None)
    try:
        result = learn(slug, min_evidence=min_evidence, actor=f"api:{g.api_user.name}")
    except (LearnError, BundleError) as exc:
        db.session.rollback()
        abort(422, description=f"no thresholds learned: {exc}")
    return jsonify(learned_json(result)), 201 if result.created else 200
