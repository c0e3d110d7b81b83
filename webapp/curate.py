"""The curator's loop: the review queue (most uncertain first), correcting one prediction per taxonomy, and
the admins' decisions on proposed labels."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import Select, and_, exists, or_, select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response
from wtforms import HiddenField, SelectMultipleField, StringField, TextAreaField

from .annotations import known_labels, mapped_result, results_with_label
from .auth import role_required
from .corrections import (
    MAX_LABEL_CHARS,
    MAX_NOTE_CHARS,
    CorrectionError,
    TaxonomyState,
    decide_proposal,
    record_correction,
    taxonomy_labels,
    taxonomy_state,
)
from .extensions import db
from .models import AnnotationEvent, LabelProposal, Prediction, PredictionResult, Taxonomy

bp = Blueprint("curate", __name__, url_prefix="/curate")


class CorrectionForm(FlaskForm):
    """One taxonomy's correction. ``labels`` are the ticked boxes (the label set to keep); ``add`` holds the
    labels typed into the search box (one without scripts, several with them)."""

    labels = SelectMultipleField(validate_choice=False)
    add = SelectMultipleField(validate_choice=False)
    propose = StringField("Propose a new label")
    note = TextAreaField("Note")
    based_on = HiddenField()

    def based_on_event(self) -> int | None:
        raw = (self.based_on.data or "").strip()
        if not raw.isdigit():
            raise CorrectionError("the form is missing the event it was based on; reload the page")
        return int(raw)


def _queue_args() -> dict[str, str]:
    """The queue filters a curator came from (kept through a save so "Save and next" stays in that queue)."""
    if request.args.get("queue") != "1":
        return {}
    return {
        "queue": "1",
        "taxonomy": request.args.get("taxonomy", "").strip()[:63],
        "label": request.args.get("label", "").strip()[:MAX_LABEL_CHARS],
    }


def queue_query(taxonomy_slug: str = "", label: str = "") -> Select:
    """Results not reviewed in their taxonomy, the smallest margin (a score nearest its threshold) first."""
    reviewed = exists().where(
        AnnotationEvent.prediction_id == PredictionResult.prediction_id,
        AnnotationEvent.taxonomy_id == PredictionResult.taxonomy_id,
    )
    stmt = select(PredictionResult).where(~reviewed).order_by(PredictionResult.margin, PredictionResult.id)
    if taxonomy_slug:
        stmt = stmt.join(Taxonomy, Taxonomy.id == PredictionResult.taxonomy_id).where(Taxonomy.slug == taxonomy_slug)
    if label:
        stmt = stmt.where(PredictionResult.id.in_(results_with_label(label)))
    return stmt


def _next_in_queue(after: PredictionResult | None, taxonomy_slug: str, label: str) -> PredictionResult | None:
    """The item after ``after`` in the queue's order, so skipping (saving nothing) still moves on."""
    stmt = queue_query(taxonomy_slug, label)
    if after is not None:
        stmt = stmt.where(
            or_(
                PredictionResult.margin > after.margin,
                and_(PredictionResult.margin == after.margin, PredictionResult.id > after.id),
            )
        )
    return db.session.scalars(stmt.limit(1)).first()


def _taxonomy_or_404(slug: str) -> Taxonomy:
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == slug))
    if taxonomy is None:
        abort(404, description=f"there is no taxonomy {slug!r}")
    return taxonomy


@bp.get("/queue")
@role_required("curator")
def queue() -> str:
    args = {"taxonomy": request.args.get("taxonomy", "").strip()[:63], "label": request.args.get("label", "").strip()}
    if len(args["label"]) > MAX_LABEL_CHARS:
        abort(400, description=f"label filters have at most {MAX_LABEL_CHARS} characters")
    if args["taxonomy"]:
        _taxonomy_or_404(args["taxonomy"])
    page = request.args.get("page", "1")
    if not page.isdigit() or not 0 < int(page) < 10**9:
        abort(400, description="page must be a whole number from 1 up")
    pagination = db.paginate(
        queue_query(args["taxonomy"], args["label"]).options(
            selectinload(PredictionResult.prediction), selectinload(PredictionResult.taxonomy)
        ),
        page=int(page),
        per_page=current_app.config["HISTORY_PER_PAGE"],
        error_out=False,
    )
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    return render_template(
        "curate/queue.html", pagination=pagination, filters=args, taxonomies=taxonomies, known_labels=known_labels(5000)
    )


def _prediction_or_404(prediction_id: int) -> Prediction:
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    return prediction


def _render_page(
    prediction: Prediction, failed: tuple[str, CorrectionForm, str] | None = None, status: int = 200
) -> tuple[str, int]:
    """The prediction, and per taxonomy its current labels, the correction form and the events."""
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    sections = []
    for taxonomy in taxonomies:
        state = taxonomy_state(prediction, taxonomy)
        if state.result is None and taxonomy.active_version_id is None and not state.events:
            continue
        ticked = None
        if failed and failed[0] == taxonomy.slug:
            form, error = failed[1], failed[2]
            ticked = set(form.labels.data or [])
        else:
            form, error = CorrectionForm(formdata=None, based_on=str(state.latest_event_id)), None
        sections.append(
            {
                "state": state,
                "form": form,
                "error": error,
                "choices": _label_choices(state, ticked),
                "vocabulary": taxonomy_labels(taxonomy),
            }
        )
    return (
        render_template(
            "curate/prediction.html",
            prediction=prediction,
            sections=sections,
            queue_args=_queue_args(),
            max_label=MAX_LABEL_CHARS,
            max_note=MAX_NOTE_CHARS,
        ),
        status,
    )


def _label_choices(state: TaxonomyState, ticked: set[str] | None, near_misses: int = 5) -> list[dict[str, object]]:
    """Checkboxes: every current label and the best-scoring labels not assigned; ticked are the current
    labels, or what the curator had ticked when their save failed."""
    mapped = mapped_result(state.result) if state.result else None
    scores = mapped.scores if mapped else {}
    thresholds = mapped.thresholds if mapped else {}
    current = set(state.labels)
    extra = sorted((label for label in scores if label not in current), key=lambda label: -scores[label])
    rows = sorted(current, key=lambda label: (-scores.get(label, 2.0), label)) + extra[:near_misses]
    return [
        {
            "label": label,
            "checked": label in (current if ticked is None else ticked),
            "assigned": label in current,
            "score": scores.get(label),
            "threshold": thresholds.get(label),
        }
        for label in rows
    ]


@bp.get("/predictions/<int:prediction_id>")
@role_required("curator")
def prediction(prediction_id: int) -> tuple[str, int]:
    return _render_page(_prediction_or_404(prediction_id))


@bp.post("/predictions/<int:prediction_id>/<slug>")
@role_required("curator")
def save(prediction_id: int, slug: str) -> Response | tuple[str, int]:
    """Record the correction; "Save and next" continues with the next item of the same queue."""
    prediction = _prediction_or_404(prediction_id)
    taxonomy = _taxonomy_or_404(slug)
    form = CorrectionForm()  # its CSRF token was checked by the app-wide CSRFProtect before this view
    try:
        outcome = record_correction(
            prediction,
            taxonomy,
            current_user,
            labels=[*form.labels.data, *(label for label in form.add.data if label.strip())],
            note=form.note.data,
            propose=[form.propose.data] if (form.propose.data or "").strip() else [],
            based_on=form.based_on_event(),
        )
    except CorrectionError as exc:
        db.session.rollback()
        return _render_page(prediction, (slug, form, str(exc)), 400)
    for proposal in outcome.proposals:
        flash(f"Proposed the new label “{proposal.label}” for {taxonomy.name}; an admin will decide on it.", "info")
    for other in outcome.concurrent:
        flash(
            f"While you were editing, {other.user.name} saved {_describe(other)} in {taxonomy.name}. "
            "Both changes are kept; check the labels below.",
            "warning",
        )
    if outcome.event is not None:
        flash(f"Saved {taxonomy.name}: {_describe(outcome.event)}.", "info")
    elif not outcome.proposals:
        flash(f"Nothing changed in {taxonomy.name}; nothing was recorded.", "info")
    queue_args = _queue_args()
    if request.form.get("action") == "next" and queue_args and not outcome.concurrent:
        result = outcome.state.result
        following = _next_in_queue(result, queue_args["taxonomy"], queue_args["label"])
        if following is None:
            flash("That was the last item in this queue.", "info")
            return redirect(url_for("curate.queue", taxonomy=queue_args["taxonomy"], label=queue_args["label"]))
        anchor = f"tax-{following.taxonomy.slug}"
        return redirect(
            url_for("curate.prediction", prediction_id=following.prediction_id, **queue_args, _anchor=anchor)
        )
    return redirect(url_for("curate.prediction", prediction_id=prediction.id, **queue_args, _anchor=f"tax-{slug}"))


def _describe(event: AnnotationEvent) -> str:
    parts = []
    if event.added:
        parts.append("added " + ", ".join(event.added))
    if event.removed:
        parts.append("removed " + ", ".join(event.removed))
    if event.note:
        parts.append("a note")
    return "; ".join(parts) or "no change"


class DecisionForm(FlaskForm):
    final_label = StringField("Accept as")


@bp.get("/labels")
@role_required("admin")
def proposals() -> str:
    rows = db.session.scalars(
        select(LabelProposal)
        .options(selectinload(LabelProposal.taxonomy), selectinload(LabelProposal.proposed_by))
        .order_by(LabelProposal.status != "proposed", LabelProposal.created_at.desc())
    ).all()
    return render_template("curate/labels.html", proposals=rows, form=DecisionForm(formdata=None))


@bp.post("/labels/<int:proposal_id>")
@role_required("admin")
def decide(proposal_id: int) -> Response:
    """Accept (renamed when "Accept as" differs) or reject one proposed label."""
    proposal = db.session.get(LabelProposal, proposal_id)
    if proposal is None:
        abort(404, description=f"there is no label proposal {proposal_id}")
    action = request.form.get("action")
    if action not in {"accept", "reject"}:
        abort(400, description="action must be accept or reject")
    form = DecisionForm()
    try:
        decide_proposal(proposal, current_user, accept=action == "accept", final_label=form.final_label.data)
    except CorrectionError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("curate.proposals"))
    flash(
        f"{proposal.label!r} {proposal.status}" + (f" as {proposal.final_label!r}" if action == "accept" else "") + ".",
        "info",
    )
    return redirect(url_for("curate.proposals"))
