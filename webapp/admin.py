"""Model management: the models page (every version, its metrics, the activation log; Activate and Roll back
for admins) and training from the site (queue a retrain, watch its progress, compare and promote the result)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from werkzeug.wrappers import Response
from wtforms import HiddenField, SelectField

from .accounts import safe_next
from .auth import role_required
from .config import REPO_ROOT
from .extensions import db
from .models import ActivationEvent, ModelVersion, Taxonomy, TrainingRun
from .serving.registry import RegistryError, activate, live_models, replaced_by, rollback
from .training_runs import create_run, get_run

bp = Blueprint("admin", __name__)

# Where the trainer's configs live; a queued run names one of them (``{"config": "<name>"}``).
TRAINER_CONFIGS = REPO_ROOT / "trainer" / "configs"


class RetrainForm(FlaskForm):
    taxonomy = HiddenField()
    config = SelectField("Trainer config", choices=[])


def trainer_configs(slug: str) -> list[str]:
    """Names of the configs in ``trainer/configs`` that train ``slug``: the slug-named one first, then
    ``default``, then the rest (e.g. ``smoke`` for a quick end-to-end try)."""
    names = []
    for path in sorted(TRAINER_CONFIGS.glob("*.json")):
        try:
            trains = json.loads(path.read_text(encoding="utf-8")).get("taxonomy_slug")
        except (OSError, ValueError, AttributeError):
            continue
        if trains == slug:
            names.append(path.stem)
    preferred = [name for name in (slug, "default") if name in names]
    return preferred + [name for name in names if name not in preferred]


def _back(default: str) -> Response:
    """Back to the page the button was on (its form says which), else ``default``."""
    return redirect(safe_next(request.form.get("next")) or default)


@bp.get("/models")
def models() -> str:
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    events = db.session.scalars(select(ActivationEvent).order_by(ActivationEvent.id.desc()).limit(50)).all()
    slugs = {t.id: t.slug for t in taxonomies}
    return render_template(
        "admin/models.html",
        taxonomies=taxonomies,
        events=events,
        slugs=slugs,
        loaded=live_models().loaded(),
        errors=live_models().errors,
        can_roll_back={t.slug: _can_roll_back(t) for t in taxonomies},
    )


def _can_roll_back(taxonomy: Taxonomy) -> bool:
    active = taxonomy.active_version_id
    return active is not None and replaced_by(taxonomy.id, active) is not None


@bp.post("/models/<version_id>/activate")
@role_required("admin")
def activate_version(version_id: str) -> Response:
    version = activate(version_id, actor=current_user.name)
    flash(f"{version.id} is now the active {version.taxonomy.name} model; every worker switches within seconds.", "ok")
    return _back(url_for("admin.models"))


@bp.post("/taxonomies/<slug>/rollback")
@role_required("admin")
def rollback_taxonomy(slug: str) -> Response:
    try:
        version = rollback(slug, actor=current_user.name)
    except RegistryError as exc:
        flash(f"Nothing rolled back: {exc}.", "error")
        return _back(url_for("admin.models"))
    flash(f"Rolled back: {version.id} is the active {version.taxonomy.name} model again.", "ok")
    return _back(url_for("admin.models"))


def _retrain_forms(taxonomies: list[Taxonomy]) -> dict[str, RetrainForm]:
    forms = {}
    for taxonomy in taxonomies:
        form = RetrainForm(formdata=None, taxonomy=taxonomy.slug)
        form.config.choices = trainer_configs(taxonomy.slug)
        forms[taxonomy.slug] = form
    return forms


@bp.get("/training")
@role_required("admin")
def training_runs() -> str:
    taxonomies = list(db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)))
    runs = db.session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(50)).all()
    return render_template(
        "admin/training_runs.html", taxonomies=taxonomies, runs=runs, forms=_retrain_forms(taxonomies)
    )


@bp.post("/training")
@role_required("admin")
def retrain() -> Response:
    """Queue a training run; a trainer worker (``python -m trainer worker``) claims it."""
    form = RetrainForm()
    slug = form.taxonomy.data or ""
    form.config.choices = trainer_configs(slug)
    if not form.validate():  # the only check is that the config trains this taxonomy (CSRF is app-wide)
        known = ", ".join(form.config.choices) or "none"
        flash(
            f"Nothing queued: no trainer config {form.config.data!r} trains {slug!r} (those that do: {known}).", "error"
        )
        return redirect(url_for("admin.training_runs"))
    busy = db.session.scalar(
        select(TrainingRun.id)
        .join(Taxonomy)
        .where(Taxonomy.slug == slug, TrainingRun.status.in_(("queued", "running")))
        .limit(1)
    )
    if busy is not None:
        flash(f"Nothing queued: run #{busy} for {slug} is still queued or running.", "error")
        return redirect(url_for("admin.training_run", run_id=busy))
    run = create_run(slug, {"config": form.config.data}, requested_by=current_user.name, queued=True)
    flash(f"Training run #{run.id} queued with the {form.config.data!r} config.", "ok")
    return redirect(url_for("admin.training_run", run_id=run.id))


def label_comparison(candidate: dict[str, Any], active: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-label rows for the run page: the candidate's P/R/F1/support beside the other model's F1 (``new``
    when that model did not have the label), labels with the most test examples first."""
    theirs = active.get("per_label") or {}
    rows = []
    for label, figures in (candidate.get("per_label") or {}).items():
        before = (theirs.get(label) or {}).get("f1")
        rows.append({"label": label, **figures, "active_f1": before, "new": bool(theirs) and label not in theirs})
    return sorted(rows, key=lambda row: (-int(row.get("support") or 0), row["label"]))


@bp.get("/training/<int:run_id>")
@role_required("admin")
def training_run(run_id: int) -> str:
    run = get_run(run_id)
    candidate = db.session.get(ModelVersion, run.candidate_version) if run.candidate_version else None
    active_id = run.taxonomy.active_version_id
    active = db.session.get(ModelVersion, active_id) if active_id else None
    baseline = _baseline(candidate, active)
    candidate_metrics = candidate.test_metrics if candidate else (run.metrics or {})
    baseline_metrics = baseline.test_metrics if baseline else {}
    return render_template(
        "admin/training_run.html",
        run=run,
        candidate=candidate,
        active=active,
        baseline=baseline,
        candidate_metrics=candidate_metrics,
        baseline_metrics=baseline_metrics,
        labels=label_comparison(candidate_metrics, baseline_metrics) if candidate else [],
        can_roll_back=_can_roll_back(run.taxonomy),
    )


def _baseline(candidate: ModelVersion | None, active: ModelVersion | None) -> ModelVersion | None:
    """What the candidate is compared with: the active version, or, once the candidate is the active one
    itself, the version it replaced."""
    if candidate is None or active is None or active.id != candidate.id:
        return active
    replaced = replaced_by(candidate.taxonomy_id, candidate.id)
    return db.session.get(ModelVersion, replaced) if replaced else None
