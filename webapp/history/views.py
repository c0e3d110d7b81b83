"""History of predictions: newest first, search, filters, and one prediction's page (also the result page)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request
from sqlalchemy import ColumnElement, CompoundSelect, Select, select
from sqlalchemy.orm import selectinload

from ..access.read_access import PREDICTIONS, can_read, deny_read, reader
from ..curation.annotations import LabelView, has_active_event, label_views, reviewed_predictions
from ..curation.corrections import describe
from ..evidence.explain import page_panel
from ..evidence.similar import similar_papers
from ..extensions import db
from ..models import BatchJob, ModelVersion, Prediction, PredictionResult
from ..request_input import page_number, whole_number
from ..serving.scoring import result_view
from . import paging, search

bp = Blueprint("history", __name__)

REVIEWED_CHOICES = {"": "All", "yes": "Reviewed", "no": "Not reviewed"}


def filtered_predictions(
    q: str,
    label: str,
    version: str,
    reviewed: str,
    batch: int | None = None,
    taxonomy: str = "",
    rank_pool: int | None = None,
    reach: int | None = None,
) -> Select:
    """The history query; every filter is optional. Newest first, or most relevant first when searching (of the
    newest ``rank_pool`` matches only, when given: ``search.matching``); ``reach``: how many of its rows are read
    at most, when known (a page's end), which a lone set filter plans by."""
    stmt = select(Prediction).order_by(Prediction.created_at.desc(), Prediction.id.desc())
    if batch is not None:
        stmt = stmt.where(Prediction.batch_id == batch)
    if q:  # full text, any word order, ranked (webapp/history/search.py)
        stmt = search.matching(stmt, q, pool=rank_pool)
    sets = _id_sets(label, version, reviewed, taxonomy)
    alone = _lone_set(sets, q, batch, reviewed)
    for ids in sets:
        stmt = stmt.where(_among(ids, reach if alone else None))
    if reviewed == "no":
        stmt = stmt.where(~has_active_event(Prediction.id, _taxonomy_id(taxonomy)))
    return stmt


IdSet = Callable[..., Select | CompoundSelect]


def _id_sets(label: str, version: str, reviewed: str, taxonomy: str) -> list[IdSet]:
    """The filters that name a set of predictions: each gives a select of their ids, or with ``of=`` a correlated
    test of one prediction."""
    chosen = search.taxonomy_labels(taxonomy) if label or taxonomy else []
    sets: list[IdSet] = []
    if taxonomy:
        sets.append(partial(search.taxonomy_predictions, [t.id for t in chosen]))
    if label:
        # Case and separators do not count (webapp/history/search.py). The current labels: a label a curator added finds
        # the item, one they removed does not; today's name finds items stored under the names it replaced.
        sets.append(partial(search.labelled_predictions, label, chosen))
    if version:
        sets.append(partial(_made_by, version))
    if reviewed == "yes":  # accepted or corrected, not undone, in the chosen taxonomy; a skip is no review
        sets.append(partial(reviewed_predictions, _taxonomy_id(taxonomy)))
    return sets


def _taxonomy_id(taxonomy: str) -> int | None:
    """The chosen taxonomy's id, which "reviewed" is read in (None: no taxonomy chosen, reviewed in any)."""
    return search.taxonomy_labels(taxonomy)[0].id if taxonomy else None


def lone_search(q: str, label: str, version: str, reviewed: str, taxonomy: str, batch: object) -> bool:
    """Whether the history is filtered by a search and nothing else: such a search ranks only its newest matches
    (``search.matching``'s pool), since no other filter narrows them."""
    return bool(q) and not (label or version or reviewed or taxonomy or batch)


def _among(ids: IdSet, reach: int | None = None) -> ColumnElement[bool]:
    """Predictions whose id ``ids()`` gives. Up to LIST_COUNT_CAP of them are read first (once: the page's count
    reads the same) and the page sorts those, or tests them down the history when it reaches its ``reach``-th row
    sooner (``paging.among_newest``); more are tested one by one (``ids(of=Prediction.id)``, an index probe) while
    the history is walked newest first, so a page stops after its rows instead of sorting every match of a
    frequent label (seconds at a million)."""
    found = paging.ids_up_to(ids())
    if len(found) <= paging.count_cap():
        return paging.among_newest(Prediction.id, found, reach)
    return ids(of=Prediction.id).exists()


def _counted(
    q: str, label: str, version: str, reviewed: str, batch: str, taxonomy: str
) -> Select | CompoundSelect | int | None:
    """What a filtered history counts when cheaper than its rows: a lone set filter's ids, read in index order
    however sparse they are among the newest predictions; a lone search's matches."""
    if lone_search(q, label, version, reviewed, taxonomy, batch):  # its ranked pool is the list
        return search.count_matches(q, current_app.config["SEARCH_RANK_POOL"])
    sets = _id_sets(label, version, reviewed, taxonomy)
    return sets[0]() if _lone_set(sets, q, batch, reviewed) else None


def _lone_set(sets: list[IdSet], q: str, batch: object, reviewed: str) -> bool:
    """Whether one set filter is all that narrows the history: no search, batch or "not reviewed" test beside it."""
    return len(sets) == 1 and not q and batch in (None, "") and reviewed != "no"


def _made_by(version: str, of: Any = None) -> Select:
    found = select(PredictionResult.prediction_id).where(PredictionResult.model_version_id == version)
    return found if of is None else found.where(PredictionResult.prediction_id == of)


@bp.get("/history")
def index() -> str:
    page = page_number()
    q = request.args.get("q", "").strip()[:200]
    label = request.args.get("label", "").strip()[:300]
    version = request.args.get("version", "").strip()[:80]
    for name, value in (("label", label), ("version", version)):
        if search.has_control_characters(value):  # no stored name has one (PostgreSQL refuses NUL in a query)
            abort(400, description=f"{name} must not contain control characters: {value[:40]!r}")
    batch = request.args.get("batch", "").strip()
    batch_id = whole_number(batch) if batch else None
    if batch and batch_id is None:
        abort(400, description=f"batch must be a batch number, not {batch[:20]!r}")
    job = db.session.get(BatchJob, batch_id) if batch_id is not None else None
    if job is not None and not can_read(reader(), job):  # a batch's listing is its readers' (read_access)
        deny_read(reader(), f"batch job {batch}")
    reviewed = request.args.get("reviewed", "")
    if reviewed not in REVIEWED_CHOICES:
        abort(400, description="reviewed must be 'yes', 'no' or empty")
    taxonomy = _taxonomy_arg()
    # A search alone ranks its newest matches (the rest are counted, not paged: more words narrow it).
    pool = current_app.config["SEARCH_RANK_POOL"] if lone_search(q, label, version, reviewed, taxonomy, batch) else None
    per_page = current_app.config["HISTORY_PER_PAGE"]
    pagination = paging.paginate(
        filtered_predictions(
            q, label, version, reviewed, int(batch) if batch else None, taxonomy, pool, reach=page * per_page + 1
        ),
        page,
        per_page,
        load=[selectinload(Prediction.results).selectinload(PredictionResult.taxonomy)],
        exact=not (q or label or version or reviewed or taxonomy),  # the whole history, or one batch: cheap
        counted=_counted(q, label, version, reviewed, batch, taxonomy),
        pool=pool,
    )
    paging.refuse_past_the_end(pagination)
    # Per result its current labels, the model's and the review, for the whole page in one query.
    views = label_views(r for p in pagination.items for r in p.results)
    reviewers = _reviewers(pagination.items, views, _taxonomy_id(taxonomy))
    versions = db.session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at.desc())).all()
    return render_template(
        "history/index.html",
        pagination=pagination,
        views=views,
        reviewers=reviewers,
        filters={
            "q": q,
            "taxonomy": taxonomy,
            "label": label,
            "version": version,
            "reviewed": reviewed,
            "batch": batch,
        },
        reviewed_choices=REVIEWED_CHOICES,
        versions=versions,
        taxonomies=search.taxonomy_labels(),
        # A label no taxonomy knows (in any case or spelling) is said so, with the closest ones to pick instead.
        label_lookup=search.lookup_label(label, search.taxonomy_labels(taxonomy)) if label else None,
        wordless_search=bool(q) and search.parse(q).empty,
        ranked_newest=pool if pool is not None and pagination.more else None,
    )


def _reviewers(
    predictions: list[Prediction], views: dict[int, LabelView], taxonomy_id: int | None
) -> dict[int, list[str]]:
    """Reviewed predictions -> who reviewed them, in the chosen taxonomy (any, when None): a row's badge says what
    the Review filter reads, so a paper reviewed only elsewhere is "not reviewed" there."""
    reviewers = {}
    for prediction in predictions:
        chosen = [views[r.id] for r in prediction.results if taxonomy_id in (None, r.taxonomy_id)]
        if any(view.status for view in chosen):
            reviewers[prediction.id] = sorted({name for view in chosen for name in view.reviewers})
    return reviewers


def _taxonomy_arg() -> str:
    slug = request.args.get("taxonomy", "").strip()[:63]
    if slug and not search.taxonomy_labels(slug):
        known = ", ".join(t.slug for t in search.taxonomy_labels()) or "none yet"
        abort(400, description=f"taxonomy must be one of the taxonomies' slugs ({known}), not {slug!r}")
    return slug


@bp.get("/api/v1/label-suggestions")
def label_suggestions() -> Response:
    """The labels the history's label filter offers, per taxonomy (``taxonomy``: one; ``q``: those containing it,
    case and separators aside): filled into the filter's suggestions when the taxonomy select changes."""
    chosen = search.taxonomy_labels(_taxonomy_arg())
    typed = request.args.get("q", "").strip()[:300]
    return jsonify(
        taxonomies=[{"slug": t.slug, "name": t.name, "labels": search.labels_containing(t, typed)} for t in chosen]
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
