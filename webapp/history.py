"""History of predictions: newest first, search, filters, and one prediction's page (also the result page)."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, render_template, request
from sqlalchemy import Select, or_, select
from sqlalchemy.orm import selectinload

from .annotations import has_active_event, known_labels, label_views, results_labelled
from .corrections import describe
from .explain import page_panel
from .extensions import db
from .models import BatchJob, ModelVersion, Prediction, PredictionResult
from .read_access import PREDICTIONS, can_read, deny_read, reader
from .serving.scoring import result_view
from .similar import similar_papers

bp = Blueprint("history", __name__)

REVIEWED_CHOICES = {"": "All", "yes": "Reviewed", "no": "Not reviewed"}


def _page_number() -> int:
    raw = request.args.get("page", "1").strip()
    if not raw.isdigit() or int(raw) < 1 or len(raw) > 9:
        abort(400, description=f"page must be a whole number from 1 up, not {raw[:20]!r}")
    return int(raw)


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def filtered_predictions(q: str, label: str, version: str, reviewed: str, batch: int | None = None) -> Select:
    """The history query; every filter is optional."""
    stmt = select(Prediction).order_by(Prediction.created_at.desc(), Prediction.id.desc())
    if batch is not None:
        stmt = stmt.where(Prediction.batch_id == batch)
    if q:
        pattern = f"%{_escape_like(q)}%"
        stmt = stmt.where(
            or_(Prediction.title.ilike(pattern, escape="\\"), Prediction.abstract.ilike(pattern, escape="\\"))
        )
    if label:
        # The current labels: a label a curator added finds the item, one they removed does not; today's name
        # finds items stored under the names it replaced (label surgery).
        with_label = select(PredictionResult.prediction_id).where(PredictionResult.id.in_(results_labelled(label)))
        stmt = stmt.where(Prediction.id.in_(with_label))
    if version:
        made_by = select(PredictionResult.prediction_id).where(PredictionResult.model_version_id == version)
        stmt = stmt.where(Prediction.id.in_(made_by))
    is_reviewed = has_active_event(Prediction.id)  # accepted or corrected, not undone; a skip is no review
    if reviewed == "yes":
        stmt = stmt.where(is_reviewed)
    elif reviewed == "no":
        stmt = stmt.where(~is_reviewed)
    return stmt


@bp.get("/history")
def index() -> str:
    page = _page_number()
    q = request.args.get("q", "").strip()[:200]
    label = request.args.get("label", "").strip()[:300]
    version = request.args.get("version", "").strip()[:80]
    batch = request.args.get("batch", "").strip()
    if batch and (not batch.isdigit() or len(batch) > 9):
        abort(400, description=f"batch must be a batch number, not {batch[:20]!r}")
    job = db.session.get(BatchJob, int(batch)) if batch else None
    if job is not None and not can_read(reader(), job):  # a batch's listing is its readers' (read_access)
        deny_read(reader(), f"batch job {batch}")
    reviewed = request.args.get("reviewed", "")
    if reviewed not in REVIEWED_CHOICES:
        abort(400, description="reviewed must be 'yes', 'no' or empty")
    pagination = db.paginate(
        filtered_predictions(q, label, version, reviewed, int(batch) if batch else None).options(
            selectinload(Prediction.results).selectinload(PredictionResult.taxonomy)
        ),
        page=page,
        per_page=current_app.config["HISTORY_PER_PAGE"],
        error_out=False,
        count=True,
    )
    if page > 1 and page > (pagination.pages or 1):
        abort(404, description=f"there is no page {page}; the last page is {pagination.pages or 1}")
    # Per result its current labels, the model's and the review, for the whole page in one query.
    views = label_views(r for p in pagination.items for r in p.results)
    reviewers = {  # reviewed predictions -> who reviewed them
        p.id: sorted({name for r in p.results for name in views[r.id].reviewers})
        for p in pagination.items
        if any(views[r.id].status for r in p.results)
    }
    versions = db.session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at.desc())).all()
    return render_template(
        "history/index.html",
        pagination=pagination,
        views=views,
        reviewers=reviewers,
        filters={"q": q, "label": label, "version": version, "reviewed": reviewed, "batch": batch},
        reviewed_choices=REVIEWED_CHOICES,
        versions=versions,
        known_labels=known_labels(),
    )


@bp.get("/predictions/<int:prediction_id>")
def detail(prediction_id: int) -> tuple[str, int]:
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    near = current_app.config["NEAR_MISSES"]
    views = [result_view(result, near) for result in prediction.results]
    # ?explain=<slug>&label=...: the explanation rendered here, for browsers without JavaScript.
    slug = request.args.get("explain", "").strip()[:63]
    panel = page_panel(prediction, slug, request.args.get("label", "").strip())
    similar = {}
    if can_read(reader(), PREDICTIONS):  # other people's abstracts: not for an anonymous visitor's own result
        similar = {r.taxonomy.slug: similar_papers(r, current_app.config["SIMILAR_K"]) for r in prediction.results}
    now = label_views(prediction.results)  # shown first: the labels with corrections applied, and the review
    page = render_template(
        "history/detail.html",
        prediction=prediction,
        views=views,
        current={r.taxonomy.slug: (r.taxonomy, now[r.id]) for r in prediction.results},
        describe=describe,
        is_new=request.args.get("new") == "1",
        panel=panel,
        similar=similar,
    )
    return page, panel.status
