"""Model management: the models page (every version, its metrics, the activation log; Activate and Roll back
for admins) and training from the site (queue a retrain, watch its progress, compare and promote the result).

Model actions are safe by default: activating a candidate that failed the promotion gate, and rolling back, are
done only once confirmed on a page that states the consequence with the gate's figures (a required checkbox,
no JavaScript needed); the server refuses them unconfirmed (pages: 409 and the confirmation form, API: 409)."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from werkzeug.exceptions import Conflict
from werkzeug.wrappers import Response
from wtforms import HiddenField, SelectField

from .access.accounts import safe_next
from .access.auth import role_required
from .config import REPO_ROOT
from .extensions import db
from .models import ActivationEvent, ModelVersion, Taxonomy, TrainingRun
from .serving.registry import (
    RegistryError,
    activate,
    get_taxonomy,
    get_version,
    live_models,
    replaced_by,
    rollback,
)
from .training_runs import PHASES, create_run, get_run, time_left

log = logging.getLogger(__name__)
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


class UnconfirmedAction(Conflict):
    """A model action that needs a confirmation it did not get (a 409); the message states the consequence."""


def _figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "unknown"


def gates(version_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The promotion gate's verdict on each version, from the newest training run that produced it (one query).
    A version that came another way (imported by hand) has none: no gate judged it."""
    runs = db.session.scalars(
        select(TrainingRun).where(TrainingRun.candidate_version.in_(version_ids)).order_by(TrainingRun.id.desc())
    )
    verdicts: dict[str, dict[str, Any]] = {}
    for run in runs:
        if isinstance(run.gate, dict) and run.candidate_version is not None:
            verdicts.setdefault(run.candidate_version, run.gate)
    return verdicts


def gate_of(version_id: str) -> dict[str, Any] | None:
    return gates([version_id]).get(version_id)


def gate_failed(version_id: str) -> bool:
    gate = gate_of(version_id)
    return gate is not None and gate.get("passed") is False


def activation_consequence(version: ModelVersion) -> str:
    """What activating ``version`` does, in words, with the gate's figures when a gate judged it."""
    taxonomy = version.taxonomy
    replaces = f"replaces {taxonomy.active_version_id}" if taxonomy.active_version_id else "becomes the model"
    said = f"{version.id} {replaces} for every new {taxonomy.name} prediction within seconds."
    gate = gate_of(version.id)
    if gate is None:
        return said
    verdict = "passed" if gate.get("passed") else f"failed the promotion gate ({gate.get('reason')})"
    against = (
        f" against the then active model's {_figure(gate.get('active_micro_f1'))}"
        if gate.get("active_micro_f1") is not None
        else ""
    )
    return (
        f"{version.id} {verdict}: on the same frozen test papers it scores micro-F1 "
        f"{_figure(gate.get('candidate_micro_f1'))}{against}, int8 drift {_figure(gate.get('drift'))}. {said}"
    )


def rollback_consequence(taxonomy: Taxonomy) -> str:
    """What rolling ``taxonomy`` back does: which version serves again, with both versions' test figures."""
    current = get_version(taxonomy.active_version_id) if taxonomy.active_version_id else None
    previous_id = replaced_by(taxonomy.id, current.id) if current else None
    if current is None or previous_id is None:
        raise RegistryError(f"{taxonomy.name} has no earlier version to roll back to")
    previous = get_version(previous_id)
    said = (
        f"{previous.id} becomes the active {taxonomy.name} model again instead of {current.id}, for every new "
        f"prediction within seconds: test micro-F1 {_figure(previous.test_metrics.get('micro_f1'))} instead of "
        f"{_figure(current.test_metrics.get('micro_f1'))} (each on its own test split)."
    )
    gate = gate_of(current.id)
    if gate is not None and gate.get("passed"):
        said += f" {current.id} passed the promotion gate (micro-F1 {_figure(gate.get('candidate_micro_f1'))})."
    return said + f" Activating {current.id} again undoes it."


def activate_confirmed(version_id: str, *, confirmed: bool, actor: str) -> ModelVersion:
    """Activate a version; one that failed its promotion gate only when ``confirmed``
    (:class:`UnconfirmedAction` otherwise, naming the gate's figures)."""
    version = get_version(version_id)
    if not confirmed and gate_failed(version.id):
        raise UnconfirmedAction(f"not activated without confirmation: {activation_consequence(version)}")
    activated = activate(version_id, actor=actor)
    switch_here()
    return activated


def switch_here() -> None:
    """Load the newly active versions in this process now, so the page it answers next is not stale (the other
    processes poll within ``MODEL_POLL_SECONDS``). The change is committed already: a failure here is logged, and
    this process's watcher retries it."""
    try:
        live_models().refresh()
    except Exception:
        log.exception("this process could not switch to the newly active versions yet; its watcher retries")


@bp.get("/models")
def models() -> str:
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    events = db.session.scalars(select(ActivationEvent).order_by(ActivationEvent.id.desc()).limit(50)).all()
    slugs = {t.id: t.slug for t in taxonomies}
    versions = [v.id for t in taxonomies for v in t.versions]
    live = live_models()
    live.ensure_started()
    return render_template(
        "admin/models.html",
        taxonomies=taxonomies,
        events=events,
        slugs=slugs,
        loaded=live.loaded(),
        errors=live.errors,
        can_roll_back={t.slug: _can_roll_back(t) for t in taxonomies},
        failed_gate={version for version, gate in gates(versions).items() if gate.get("passed") is False},
    )


def _can_roll_back(taxonomy: Taxonomy) -> bool:
    active = taxonomy.active_version_id
    return active is not None and replaced_by(taxonomy.id, active) is not None


def _confirmed() -> bool:
    return request.form.get("confirm") == "yes"


def _confirm_page(
    action: str, consequence: str, target: str, *, expected: str | None = None, status: int = 200, error: str = ""
) -> tuple[str, int]:
    """The confirmation form: the consequence, a required checkbox, and (rollback) the active version it was
    stated for, so a confirmation given for one state is not applied to another."""
    return (
        render_template(
            "admin/confirm.html",
            action=action,
            consequence=consequence,
            target=target,
            expected=expected,
            next=safe_next(request.values.get("next")) or url_for("admin.models"),
            error=error,
        ),
        status,
    )


@bp.get("/models/<version_id>/activate")
@role_required("admin")
def confirm_activate(version_id: str) -> tuple[str, int]:
    """The confirmation page of an activation (what the Activate button of a failed candidate leads to)."""
    version = get_version(version_id)
    target = url_for("admin.activate_version", version_id=version.id)
    return _confirm_page(f"Activate {version.id}", activation_consequence(version), target)


@bp.post("/models/<version_id>/activate")
@role_required("admin")
def activate_version(version_id: str) -> Response | tuple[str, int]:
    try:
        version = activate_confirmed(version_id, confirmed=_confirmed(), actor=current_user.name)
    except UnconfirmedAction:
        version = get_version(version_id)
        target = url_for("admin.activate_version", version_id=version.id)
        error = "Nothing activated: it failed the promotion gate, so tick the box to confirm."
        return _confirm_page(f"Activate {version.id}", activation_consequence(version), target, status=409, error=error)
    flash(f"{version.id} is now the active {version.taxonomy.name} model; every worker switches within seconds.", "ok")
    return _back(url_for("admin.models"))


@bp.get("/taxonomies/<slug>/rollback")
@role_required("admin")
def confirm_rollback(slug: str) -> Response | tuple[str, int]:
    """The confirmation page of a rollback (what every Roll back button leads to)."""
    taxonomy = get_taxonomy(slug)
    try:
        consequence = rollback_consequence(taxonomy)
    except RegistryError as exc:
        flash(f"Nothing to roll back: {exc}.", "error")
        return redirect(url_for("admin.models"))
    target = url_for("admin.rollback_taxonomy", slug=slug)
    return _confirm_page(f"Roll back {taxonomy.name}", consequence, target, expected=taxonomy.active_version_id)


@bp.post("/taxonomies/<slug>/rollback")
@role_required("admin")
def rollback_taxonomy(slug: str) -> Response | tuple[str, int]:
    taxonomy = get_taxonomy(slug)
    try:
        consequence = rollback_consequence(taxonomy)
    except RegistryError as exc:
        flash(f"Nothing rolled back: {exc}.", "error")
        return _back(url_for("admin.models"))
    expected = request.form.get("expected")
    if not _confirmed() or expected != taxonomy.active_version_id:
        target = url_for("admin.rollback_taxonomy", slug=slug)
        error = (
            "Nothing rolled back: tick the box to confirm."
            if expected in (None, taxonomy.active_version_id)
            else f"Nothing rolled back: the active version changed to {taxonomy.active_version_id} meanwhile; "
            "read what rolling back does now and confirm again."
        )
        return _confirm_page(
            f"Roll back {taxonomy.name}",
            consequence,
            target,
            expected=taxonomy.active_version_id,
            status=409,
            error=error,
        )
    version = rollback(slug, actor=current_user.name)
    switch_here()
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
        gate_failed=bool(run.gate) and run.gate.get("passed") is False,
        phases=PHASES,
        time_left=time_left(run),
    )


def _baseline(candidate: ModelVersion | None, active: ModelVersion | None) -> ModelVersion | None:
    """What the candidate is compared with: the active version, or, once the candidate is the active one
    itself, the version it replaced."""
    if candidate is None or active is None or active.id != candidate.id:
        return active
    replaced = replaced_by(candidate.taxonomy_id, candidate.id)
    return db.session.get(ModelVersion, replaced) if replaced else None
