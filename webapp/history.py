"""History of predictions: newest first, search, filters, and one prediction's page (also the result page)."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, render_template, request
from sqlalchemy import Select, exists, or_, select

from .annotations import known_labels, results_with_label
from .explain import page_panel
from .extensions import db
from .models import AnnotationEvent, BatchJob, ModelVersion, PredictedLabel, Prediction, PredictionResult, User
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
        # Today's name finds items stored under the names it replaced (label surgery).
        with_label = select(PredictedLabel.prediction_id).where(PredictedLabel.result_id.in_(results_with_label(label)))
        stmt = stmt.where(Prediction.id.in_(with_label))
    if version:
        made_by = select(PredictionResult.prediction_id).where(PredictionResult.model_version_id == version)
        stmt = stmt.where(Prediction.id.in_(made_by))
    is_reviewed = exists().where(AnnotationEvent.prediction_id == Prediction.id)
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
        filtered_predictions(q, label, version, reviewed, int(batch) if batch else None),
        page=page,
        per_page=current_app.config["HISTORY_PER_PAGE"],
        error_out=False,
        count=True,
    )
    if page > 1 and page > (pagination.pages or 1):
        abort(404, description=f"there is no page {page}; the last page is {pagination.pages or 1}")
    reviewers: dict[int, list[str]] = {}  # prediction id -> who reviewed it
    if pagination.items:
        ids = [p.id for p in pagination.items]
        rows = db.session.execute(
            select(AnnotationEvent.prediction_id, User.name)
            .join(User, User.id == AnnotationEvent.user_id)
            .where(AnnotationEvent.prediction_id.in_(ids))
            .distinct()
            .order_by(User.name)
        )
        for prediction_id, name in rows:
            reviewers.setdefault(prediction_id, []).append(name)
    versions = db.session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at.desc())).all()
    return render_template(
        "history/index.html",
        pagination=pagination,
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
    page = render_template(
        "history/detail.html",
        prediction=prediction,
        views=views,
        is_new=request.args.get("new") == "1",
        panel=panel,
        similar=similar,
    )
    return page, panel.status
