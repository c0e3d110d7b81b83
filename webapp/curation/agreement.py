"""Several curators per item (issue 12 point 5): how much they agree (Krippendorff's alpha from the
``krippendorff`` package), where they disagree, and an adjudicator's final label set.

A curator's *review* of a (prediction, taxonomy) is the label set they left it with: the current labels right
after their latest active accept or correction (the model's labels with every event up to that one applied).
Events record a difference against what the curator saw, so "the model's labels with only their own events"
would misstate a curator who accepted labels another curator had already corrected: they confirmed those labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import krippendorff
import numpy as np
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response
from wtforms import SelectMultipleField, TextAreaField

from ..access.auth import has_role, role_required
from ..extensions import db
from ..models import AnnotationEvent, Prediction, PredictionResult, Taxonomy
from .annotations import CURATOR_REVIEW_KINDS, active_events, current_labels, has_active_event, reviewer_count
from .corrections import CorrectionError, ReviewCommand, ReviewForbidden, ReviewPart, describe

bp = Blueprint("agreement", __name__)


def awaiting_review(prediction_id: object, taxonomy_id: object, user_id: int | None) -> ColumnElement[bool]:
    """SQL: the item is still in ``user_id``'s review queue. With ``REVIEWS_NEEDED`` = 1: nobody reviewed it.
    Above: fewer distinct curators than that reviewed it, this curator is not one of them, and no adjudicator
    settled it."""
    needed = current_app.config["REVIEWS_NEEDED"]
    if needed <= 1:
        return ~has_active_event(prediction_id, taxonomy_id)
    clause = and_(
        ~has_active_event(prediction_id, taxonomy_id, ["adjudicated"]),
        reviewer_count(prediction_id, taxonomy_id) < needed,
    )
    if user_id is not None:
        clause = and_(clause, ~has_active_event(prediction_id, taxonomy_id, user_id=user_id))
    return clause


@dataclass(frozen=True)
class Review:
    """One curator's review of one item: their label set (see the module's docstring)."""

    user: str
    labels: tuple[str, ...]
    event_id: int


@dataclass
class Item:
    """A (prediction, taxonomy) that at least two curators reviewed."""

    prediction: Prediction
    model: list[str]
    reviews: list[Review]
    current: list[str]
    adjudication: AnnotationEvent | None

    @property
    def disagree(self) -> bool:
        return len({review.labels for review in self.reviews}) > 1

    @property
    def candidate_labels(self) -> list[str]:
        """What the resolve form offers: every label a reviewer gave, the model's and the current ones."""
        return sorted({label for r in self.reviews for label in r.labels} | set(self.model) | set(self.current))


@dataclass(frozen=True)
class LabelAgreement:
    """One label, present/absent per reviewer, over the items at least two curators reviewed."""

    label: str
    votes: int  # reviews that gave the label
    split_items: int  # items where the reviewers split on it
    alpha: float | None  # None: undefined (every reviewer gave the same answer everywhere)


@dataclass
class TaxonomyAgreement:
    taxonomy: Taxonomy
    items: list[Item]
    reviewers: list[str]
    overall: float | None = None
    labels: list[LabelAgreement] = field(default_factory=list)

    @property
    def disagreements(self) -> list[Item]:
        """Items whose reviewers' label sets differ, unresolved first."""
        return sorted(
            (i for i in self.items if i.disagree), key=lambda i: (i.adjudication is not None, i.prediction.id)
        )


def curator_reviews(result: PredictionResult | None, events: list[AnnotationEvent]) -> list[Review]:
    """Each curator's review of one item (the events of one prediction in one taxonomy), by name."""
    latest: dict[int, AnnotationEvent] = {}
    for event in active_events(events):
        if event.kind in CURATOR_REVIEW_KINDS:
            latest[event.user_id] = event  # oldest first: the last one stays
    return sorted(
        (
            Review(
                event.user.name,
                tuple(sorted(current_labels(result, [e for e in events if e.id <= event.id]))),
                event.id,
            )
            for event in latest.values()
        ),
        key=lambda r: r.user,
    )


def alpha(matrix: np.ndarray) -> float | None:
    """Nominal Krippendorff's alpha of a reviewers x units matrix of 1/0 (NaN: not reviewed); None where it is
    undefined (a single value throughout: nothing to tell agreement from chance)."""
    if matrix.size == 0 or len(np.unique(matrix[~np.isnan(matrix)])) < 2:
        return None
    value = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))
    return None if math.isnan(value) else value


def taxonomy_agreement(taxonomy: Taxonomy) -> TaxonomyAgreement:
    """The taxonomy's items with two or more curator reviews, overall and per-label alpha."""
    events = db.session.scalars(
        select(AnnotationEvent)
        .where(AnnotationEvent.taxonomy_id == taxonomy.id)
        .options(selectinload(AnnotationEvent.user))
        .order_by(AnnotationEvent.id)
    )
    groups: dict[int, list[AnnotationEvent]] = {}
    for event in events:
        groups.setdefault(event.prediction_id, []).append(event)
    items = []
    predictions = db.session.scalars(
        select(Prediction).where(Prediction.id.in_(list(groups))).options(selectinload(Prediction.results))
    )
    for prediction in predictions:
        own = groups[prediction.id]
        result = next((r for r in prediction.results if r.taxonomy_id == taxonomy.id), None)
        reviews = curator_reviews(result, own)
        if len(reviews) < 2:
            continue
        adjudications = [e for e in active_events(own) if e.kind == "adjudicated"]
        model = current_labels(result, []) if result is not None else []
        items.append(
            Item(prediction, model, reviews, current_labels(result, own), adjudications[-1] if adjudications else None)
        )
    reviewers = sorted({r.user for item in items for r in item.reviews})
    report = TaxonomyAgreement(taxonomy, items, reviewers)
    if not items:
        return report
    row = {name: n for n, name in enumerate(reviewers)}
    matrices = []
    for label in sorted({label for item in items for r in item.reviews for label in r.labels}):
        matrix = np.full((len(reviewers), len(items)), np.nan)
        for column, item in enumerate(items):
            for review in item.reviews:
                matrix[row[review.user], column] = float(label in review.labels)
        matrices.append(matrix)
        votes = int(np.nansum(matrix))
        split = sum(1 for item in items if len({label in r.labels for r in item.reviews}) > 1)
        report.labels.append(LabelAgreement(label, votes, split, alpha(matrix)))
    report.overall = alpha(np.hstack(matrices)) if matrices else None  # units: every (item, label) pair
    return report


class ResolveForm(FlaskForm):
    """An adjudicator's final label set: the ticked labels plus any typed in ``add``."""

    labels = SelectMultipleField(validate_choice=False, default=list)  # a form posted without it: no labels
    add = SelectMultipleField(validate_choice=False, default=list)
    note = TextAreaField("Note")


def _taxonomies(slug: str) -> list[Taxonomy]:
    query = select(Taxonomy).order_by(Taxonomy.slug)
    if slug:
        query = query.where(Taxonomy.slug == slug)
    found = list(db.session.scalars(query))
    if slug and not found:
        abort(404, description=f"there is no taxonomy {slug[:63]!r}")
    return found


@bp.get("/agreement")
@role_required("curator")
def page() -> tuple[str, int]:
    """Per taxonomy: overall and per-label alpha, the disagreements with who said what, and (adjudicators) a
    resolve form per disagreement."""
    return _render(request.args.get("taxonomy", "").strip()[:63])


@dataclass(frozen=True)
class Refused:
    """A resolve form the review command refused, shown again as it was sent (boxes, other labels, note) with
    the reason in its own card."""

    slug: str
    prediction_id: int
    labels: list[str]
    add: str
    note: str
    error: str


def _render(slug: str, refused: Refused | None = None) -> tuple[str, int]:
    reports = [taxonomy_agreement(t) for t in _taxonomies(slug)]
    page = render_template(
        "agreement/index.html",
        reports=reports,
        slug=slug,
        all_taxonomies=_taxonomies(""),
        reviews_needed=current_app.config["REVIEWS_NEEDED"],
        can_resolve=has_role(current_user, "adjudicator"),
        form=ResolveForm(formdata=None),
        refused=refused,
        # The refused item may have left the disagreements meanwhile: its reason then goes at the top.
        refused_unlisted=refused is not None
        and not any(
            r.taxonomy.slug == refused.slug and item.prediction.id == refused.prediction_id
            for r in reports
            for item in r.disagreements
        ),
        describe=describe,
    )
    return page, 200 if refused is None else 400


@bp.post("/agreement/<slug>/<int:prediction_id>")
@role_required("adjudicator")
def resolve(slug: str, prediction_id: int) -> Response | tuple[str, int]:
    """Record the final label set as an ``adjudicated`` event through the review command."""
    (taxonomy,) = _taxonomies(slug)
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    form = ResolveForm()
    labels = [*form.labels.data, *(label for label in form.add.data if label.strip())]
    try:
        ReviewCommand(
            prediction, current_user, [ReviewPart(taxonomy, "adjudicate", labels=labels, note=form.note.data)]
        ).run()
    except ReviewForbidden as exc:
        db.session.rollback()
        abort(403, description=str(exc))
    except CorrectionError as exc:
        db.session.rollback()
        typed = ", ".join(label for label in form.add.data if label.strip())
        return _render(
            slug,
            Refused(
                taxonomy.slug, prediction_id, form.labels.data, typed, form.note.data or "", f"Not resolved: {exc}"
            ),
        )
    flash(f"Resolved #{prediction_id} in {taxonomy.name}: {', '.join(sorted(set(labels))) or 'no label'}.", "info")
    return redirect(url_for("agreement.page", taxonomy=slug, _anchor=f"item-{slug}-{prediction_id}"))
