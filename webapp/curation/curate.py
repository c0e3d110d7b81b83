"""The curator's loop: the review queue (most uncertain first, skipped items last), reviewing one prediction in
all its taxonomies with one form (correct, accept, skip, undo), and the admins' decisions on proposed labels."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import ColumnElement, CompoundSelect, Select, and_, false, select, true, union_all
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response
from wtforms import HiddenField, SelectMultipleField, StringField, TextAreaField

from ..access.auth import role_required
from ..extensions import db
from ..history import search
from ..history.paging import CappedPagination, count_cap, count_up_to, refuse_past_the_end
from ..models import DATASET_SOURCE, AnnotationEvent, LabelProposal, Prediction, PredictionResult, Taxonomy
from ..request_input import page_number, whole_number
from .agreement import awaiting_review
from .annotations import has_active_event, known_labels, mapped_result
from .corrections import (
    MAX_LABEL_CHARS,
    MAX_NOTE_CHARS,
    CorrectionError,
    ReviewCommand,
    ReviewConflict,
    ReviewForbidden,
    ReviewPart,
    TaxonomyState,
    decide_proposal,
    describe,
    taxonomy_labels,
    taxonomy_state,
)

bp = Blueprint("curate", __name__, url_prefix="/curate")


class CorrectionForm(FlaskForm):
    """One taxonomy's part of the review form. On the page every taxonomy's fields carry its slug as a prefix
    (``<slug>-labels``), so one form and one submit cover them all; ``labels`` are the ticked boxes (the label set
    to keep), ``add`` the labels typed into the search box. The page's one CSRF token is checked app-wide."""

    class Meta:
        csrf = False

    labels = SelectMultipleField(validate_choice=False, default=list)  # a form posted without it: no labels
    add = SelectMultipleField(validate_choice=False, default=list)
    propose = StringField("Propose a new label")
    note = TextAreaField("Note")
    based_on = HiddenField()

    def based_on_event(self) -> int | None:
        event = whole_number((self.based_on.data or "").strip())
        if event is None:
            raise CorrectionError("the form is missing the event it was based on; reload the page")
        return event

    def part(self, taxonomy: Taxonomy, action: str) -> ReviewPart:
        """This taxonomy's share of the review the pressed button asks for."""
        if action in {"skip", "undo"}:
            return ReviewPart(taxonomy, action, note=self.note.data)
        return ReviewPart(
            taxonomy,
            action,
            labels=[*self.labels.data, *(label for label in self.add.data if label.strip())],
            note=self.note.data,
            propose=[self.propose.data] if (self.propose.data or "").strip() else [],
            based_on=self.based_on_event(),
        )


# The page's buttons: the review action and whether a queue moves on to its next item afterwards.
BUTTONS = {
    "save": ("correct", False),
    "next": ("correct", True),
    "accept": ("accept", False),
    "accept-next": ("accept", True),
    "skip": ("skip", True),
}


def _queue_args() -> dict[str, str]:
    """The queue filters a curator came from (kept through a save so "Save and next" stays in that queue)."""
    if request.args.get("queue") != "1":
        return {}
    return {
        "queue": "1",
        "taxonomy": request.args.get("taxonomy", "").strip()[:63],
        "label": request.args.get("label", "").strip()[:MAX_LABEL_CHARS],
    }


def queue_query(taxonomy_slug: str = "", label: str = "", user_id: int | None = None) -> Select:
    """Results still awaiting review in their taxonomy (nobody accepted or corrected them; with REVIEWS_NEEDED
    above 1, fewer curators than that and not ``user_id``: webapp/curation/agreement.py), unordered; base-data
    papers have the label-error queue instead."""
    stmt = (
        select(PredictionResult)
        .join(Prediction, Prediction.id == PredictionResult.prediction_id)
        .where(*_waiting(taxonomy_slug, user_id))
    )
    if label:  # read as the history's filter reads it: case and separators aside, in today's names
        taxonomies = search.taxonomy_labels(taxonomy_slug)
        labelled = search.labelled_results(label, taxonomies)
        if count_up_to(labelled) > count_cap():  # a frequent label: tested per item as the margin order is walked
            labelled = search.labelled_results(label, taxonomies, of=Prediction.id)
        stmt = stmt.where(PredictionResult.id.in_(labelled))
    return stmt


def _waiting(taxonomy_slug: str, user_id: int | None) -> list[ColumnElement[bool]]:
    """The queue's conditions on a result (``PredictionResult``) and its prediction (``Prediction``)."""
    conditions = [
        awaiting_review(PredictionResult.prediction_id, PredictionResult.taxonomy_id, user_id),
        Prediction.source != DATASET_SOURCE,
    ]
    if taxonomy_slug:
        taxonomy = select(Taxonomy.id).where(Taxonomy.slug == taxonomy_slug).scalar_subquery()
        conditions.append(PredictionResult.taxonomy_id == taxonomy)
    return conditions


@dataclass(frozen=True)
class Queue:
    """A curator's review queue in its order: the smallest margin (a score nearest its threshold) first, and the
    items they skipped at the back. Two walks of the margin index, each able to stop after a page, rather than one
    order that sorts every waiting result (seconds at a million, bench/scale.py)."""

    fresh: Select  # not skipped by this curator, in queue order
    skipped: Select  # skipped by this curator, in queue order
    fresh_ids: Select | CompoundSelect  # as many different ids as ``fresh`` has rows, cheaper to count

    @classmethod
    def of(cls, taxonomy_slug: str = "", label: str = "", user_id: int | None = None) -> Queue:
        base = queue_query(taxonomy_slug, label, user_id)
        order = (PredictionResult.margin, PredictionResult.id)
        fresh, skipped = true(), false()
        if user_id is not None:
            mine = has_active_event(PredictionResult.prediction_id, PredictionResult.taxonomy_id, ["skipped"], user_id)
            their_skips = select(AnnotationEvent.prediction_id).where(
                AnnotationEvent.user_id == user_id, AnnotationEvent.kind == "skipped"
            )  # few: the skipped walk starts from them
            fresh, skipped = ~mine, and_(PredictionResult.prediction_id.in_(their_skips), mine)
        fresh_ids = base.with_only_columns(PredictionResult.id).where(fresh)
        if label:  # counted from the label's results (index ranges), however sparse among the smallest margins
            parts = [
                part.join(PredictionResult, PredictionResult.id == part.selected_columns[0])
                .join(Prediction, Prediction.id == PredictionResult.prediction_id)
                .with_only_columns(PredictionResult.id)
                .where(*_waiting(taxonomy_slug, user_id), fresh)
                for part in search.labelled_parts(label, search.taxonomy_labels(taxonomy_slug))
            ]
            fresh_ids = union_all(*parts)
        return cls(
            base.where(fresh).order_by(*order),
            base.where(skipped).order_by(*order),
            fresh_ids,
        )

    def page(self, offset: int, limit: int) -> list[PredictionResult]:
        loads = (selectinload(PredictionResult.prediction), selectinload(PredictionResult.taxonomy))
        items = list(db.session.scalars(self.fresh.options(*loads).limit(limit).offset(offset)))
        if len(items) < limit:
            fresh = offset + len(items) if items else count_up_to(self.fresh, offset)
            back = self.skipped.options(*loads).limit(limit - len(items)).offset(max(0, offset - fresh))
            items += db.session.scalars(back)
        return items


class QueuePagination(CappedPagination):
    """A page of a :class:`Queue`; the count stops at ``LIST_COUNT_CAP`` fresh items."""

    def _rows(self, offset: int, limit: int) -> list[PredictionResult]:
        return self._query_args["queue"].page(offset, limit)

    def _query_count(self) -> int:
        queue = self._query_args["queue"]
        fresh = self._capped(count_up_to(queue.fresh_ids, distinct=True))
        return fresh if self.more else fresh + count_up_to(queue.skipped)


def _next_in_queue(prediction: Prediction, taxonomy_slug: str, label: str) -> PredictionResult | None:
    """The first queue item of another prediction: the one just reviewed has left the queue, a skipped one has
    gone to its back."""
    queue = Queue.of(taxonomy_slug, label, current_user.id)
    for part in (queue.fresh, queue.skipped):
        found = db.session.scalars(part.where(PredictionResult.prediction_id != prediction.id).limit(1)).first()
        if found is not None:
            return found
    return None


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
    page = page_number()
    pagination = QueuePagination(
        page=page,
        per_page=current_app.config["HISTORY_PER_PAGE"],
        max_per_page=None,
        error_out=False,
        queue=Queue.of(args["taxonomy"], args["label"], current_user.id),
    )
    refuse_past_the_end(pagination)
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    return render_template(
        "curate/queue.html", pagination=pagination, filters=args, taxonomies=taxonomies, known_labels=known_labels(5000)
    )


def _prediction_or_404(prediction_id: int) -> Prediction:
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    return prediction


def _page_states(prediction: Prediction) -> list[TaxonomyState]:
    """The taxonomies the review page shows: those that answered, have an active model, or have events."""
    states = [taxonomy_state(prediction, t) for t in db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug))]
    return [s for s in states if s.result is not None or s.taxonomy.active_version_id is not None or s.events]


def _render_page(
    prediction: Prediction, submitted: dict[str, CorrectionForm] | None = None, error: str = "", status: int = 200
) -> tuple[str, int]:
    """The prediction, and per taxonomy its current labels, the model's, its part of the one review form and
    its events. After a refused save, the boxes stay as the curator left them (nothing typed is lost)."""
    sections = []
    for state in _page_states(prediction):
        slug = state.taxonomy.slug
        form = (submitted or {}).get(slug)
        ticked = set(form.labels.data or []) if form is not None else None
        if form is None:
            form = CorrectionForm(formdata=None, prefix=slug, based_on=str(state.latest_event_id))
        sections.append(
            {
                "state": state,
                "form": form,
                "choices": _label_choices(state, ticked),
                "vocabulary": taxonomy_labels(state.taxonomy),
                "undoable": state.undoable(current_user),
            }
        )
    return (
        render_template(
            "curate/prediction.html",
            prediction=prediction,
            sections=sections,
            error=error,
            queue_args=_queue_args(),
            max_label=MAX_LABEL_CHARS,
            max_note=MAX_NOTE_CHARS,
            describe=describe,
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


@bp.post("/predictions/<int:prediction_id>")
@role_required("curator")
def review(prediction_id: int) -> Response | tuple[str, int]:
    """The page's one form: every taxonomy's labels in one submit. Save records the changed taxonomies, Accept
    also confirms the unchanged ones, Skip puts the item at the back of this curator's queue; "Undo" (one per
    taxonomy) reverses the curator's latest event there."""
    prediction = _prediction_or_404(prediction_id)
    states = _page_states(prediction)
    forms = {state.taxonomy.slug: CorrectionForm(prefix=state.taxonomy.slug) for state in states}
    button = request.form.get("action", "save")
    if button.startswith("undo:"):
        slug = button.removeprefix("undo:")
        if slug not in forms:
            abort(400, description=f"there is no taxonomy {slug[:63]!r} on this page to undo in")
        taxonomies = {slug: next(s.taxonomy for s in states if s.taxonomy.slug == slug)}
        return _apply(prediction, taxonomies, forms, "undo", move_on=False)
    if button not in BUTTONS:
        abort(400, description=f"action must be one of {', '.join(BUTTONS)} or undo:<taxonomy>, not {button[:40]!r}")
    action, move_on = BUTTONS[button]
    if action == "skip":  # only what the model answered is in a queue
        states = [state for state in states if state.result is not None]
    return _apply(prediction, {s.taxonomy.slug: s.taxonomy for s in states}, forms, action, move_on)


@bp.post("/predictions/<int:prediction_id>/<slug>")
@role_required("curator")
def save(prediction_id: int, slug: str) -> Response | tuple[str, int]:
    """One taxonomy's review with unprefixed fields (``labels``, ``add``, ``note``, ``based_on``), for scripts."""
    prediction = _prediction_or_404(prediction_id)
    taxonomy = _taxonomy_or_404(slug)
    button = request.form.get("action", "save")
    if button not in BUTTONS:
        abort(400, description=f"action must be one of {', '.join(BUTTONS)}, not {button[:40]!r}")
    action, move_on = BUTTONS[button]
    return _apply(prediction, {slug: taxonomy}, {slug: CorrectionForm()}, action, move_on)


def _apply(
    prediction: Prediction,
    taxonomies: dict[str, Taxonomy],
    forms: dict[str, CorrectionForm],
    action: str,
    move_on: bool,
) -> Response | tuple[str, int]:
    """Run the review command; a refusal re-renders the page with the message and the boxes as ticked, except
    where a stale accept was refused: those taxonomies show their labels now, to be checked and accepted again."""
    try:
        parts = [forms[slug].part(taxonomy, action) for slug, taxonomy in taxonomies.items()]
        outcomes = ReviewCommand(prediction, current_user, parts).run()
    except ReviewForbidden as exc:
        db.session.rollback()
        abort(403, description=str(exc))
    except ReviewConflict as exc:
        db.session.rollback()
        stale = {state.taxonomy.slug for state in exc.stale}
        return _render_page(prediction, {s: f for s, f in forms.items() if s not in stale}, str(exc), 409)
    except CorrectionError as exc:
        db.session.rollback()
        return _render_page(prediction, forms, str(exc), 400)
    concurrent = False
    for outcome in outcomes:
        name = outcome.state.taxonomy.name
        for proposal in outcome.proposals:
            flash(f"Proposed the new label “{proposal.label}” for {name}; an admin will decide on it.", "info")
        for other in outcome.concurrent:
            concurrent = True
            flash(
                f"While you were editing, {other.user.name} saved {describe(other)} in {name}. "
                "Both changes are kept; check the labels below.",
                "warning",
            )
        if outcome.event is not None:
            flash(f"Saved {name}: {describe(outcome.event)}.", "info")
    queue_args = _queue_args()
    anchor = f"tax-{next(iter(taxonomies))}"
    if move_on and queue_args and not concurrent:
        following = _next_in_queue(prediction, queue_args["taxonomy"], queue_args["label"])
        if following is None:
            flash("That was the last item in this queue.", "info")
            return redirect(url_for("curate.queue", taxonomy=queue_args["taxonomy"], label=queue_args["label"]))
        anchor = f"tax-{following.taxonomy.slug}"
        return redirect(
            url_for("curate.prediction", prediction_id=following.prediction_id, **queue_args, _anchor=anchor)
        )
    return redirect(url_for("curate.prediction", prediction_id=prediction.id, **queue_args, _anchor=anchor))


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
