"""Corrections: the current gold labels derived from the append-only annotation events and the taxonomy's label
changes.

The original prediction is never changed; a prediction's current labels in a taxonomy are what its model
predicted, with each active correction's added and removed labels applied in order, then read through the label
changes (renames, merges, splits: ``webapp/surgery.py``) that are not undone. An event is active unless an active
``undo`` event undoes it (so undoing an undo re-applies); ``accepted`` and ``skipped`` events change no label.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, g
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    ScalarSelect,
    Select,
    and_,
    delete,
    distinct,
    exists,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import aliased, selectinload

from ..extensions import db
from ..models import (
    AnnotationEvent,
    CurrentLabel,
    LabelChange,
    LabelProposal,
    PredictedLabel,
    Prediction,
    PredictionResult,
    Taxonomy,
)
from ..serving.bundle import compose_text
from ..surgery import LabelMap, Rule


def label_map(taxonomy_id: int) -> LabelMap:
    """The taxonomy's label changes not undone, oldest first. Every taxonomy's are read at the first call of a
    request (app context), in one query: a predict call maps the answers of all its taxonomies."""
    if "label_maps" not in g:
        rules: dict[int, list[Rule]] = {}
        for change in db.session.scalars(
            select(LabelChange).where(LabelChange.undone_at.is_(None)).order_by(LabelChange.id)
        ):
            rules.setdefault(change.taxonomy_id, []).append(
                Rule.from_payload(change.id, change.kind, change.payload, change.created_at)
            )
        g.label_maps = {tid: LabelMap(taxonomy_rules) for tid, taxonomy_rules in rules.items()}
    maps: dict[int, LabelMap] = g.label_maps
    return maps.get(taxonomy_id) or LabelMap()


def forget_label_maps() -> None:
    """After recording or undoing a change, so this request reads the new mapping."""
    g.pop("label_maps", None)


def prediction_text(prediction: Prediction) -> str:
    """The text split keywords are looked for in (the same the model and the trainer read)."""
    return compose_text(prediction.title, prediction.abstract)


# Events that review an item (it leaves the queue, live quality counts it); a skip is seen, not decided. An
# adjudication (an adjudicator's final label set where curators disagreed, agreement.py) is a review too.
REVIEW_KINDS = ("correction", "accepted", "adjudicated")
# Events that change labels: a correction (a difference) and an adjudication (the whole final set).
LABEL_KINDS = ("correction", "adjudicated")


def active_events(events: Iterable[AnnotationEvent]) -> list[AnnotationEvent]:
    """The events no active undo reverses, oldest first. Walked newest first: an undo only ever targets an older
    event, so by the time an event is reached, whether it is undone is known."""
    ordered = sorted(events, key=lambda e: e.id)
    undone: set[int] = set()
    for event in reversed(ordered):
        if event.kind == "undo" and event.id not in undone and event.undoes_id is not None:
            undone.add(event.undoes_id)
    return [e for e in ordered if e.id not in undone]


def review_status(events: Iterable[AnnotationEvent]) -> str | None:
    """ "adjudicated" when an adjudicator set the final labels, "corrected" when an active correction changed
    labels, "accepted" when an active review confirmed them (an accept, or a correction that only left a note),
    None when nobody reviewed the item."""
    reviews = [e for e in active_events(events) if e.kind in REVIEW_KINDS]
    if any(e.kind == "adjudicated" for e in reviews):
        return "adjudicated"
    if any(e.added or e.removed for e in reviews):
        return "corrected"
    return "accepted" if reviews else None


def current_labels(result: PredictionResult | None, events: list[AnnotationEvent]) -> list[str]:
    """Predicted labels with the active corrections applied in order (events must belong to the result's
    taxonomy), in today's names. Each event is applied in the names of its own time (the changes made before it),
    so an old removal of one merged label keeps its sibling, and a new removal under the merged name removes both.
    An adjudication replaces the labels with its final set (``added``); later events apply on top of it."""
    if result is None and not events:
        return []
    taxonomy_id = result.taxonomy_id if result is not None else events[0].taxonomy_id
    labels_map = label_map(taxonomy_id)
    text = prediction_text(result.prediction if result is not None else events[0].prediction)
    labels = set(result.labels) if result is not None else set()
    for event in sorted(active_events(events), key=lambda e: (e.created_at, e.id)):
        if event.kind == "adjudicated":
            labels = set(event.added)
            continue
        if event.kind != "correction":
            continue
        removed, kept = set(event.removed), set()
        for label in labels - removed:
            then = labels_map.map_label(label, text, until=event.created_at)
            kept |= then - removed if then & removed else {label}
        labels = kept | set(event.added)
    return labels_map.map_labels(labels, text)


@dataclass(frozen=True)
class LabelView:
    """One result as list pages show it: the current labels, the model's (one click away) and the review."""

    taxonomy_id: int
    labels: list[str]
    model: list[str]
    status: str | None  # "accepted", "corrected" or None
    reviewers: list[str]
    # The labels are the model's best guess (none passed its threshold) and nobody has reviewed them yet.
    best_guess: bool = False

    @property
    def changed(self) -> bool:
        return sorted(self.labels) != sorted(self.model)


def label_views(results: Iterable[PredictionResult]) -> dict[int, LabelView]:
    """Result id -> its LabelView, with the events of all the results read in one query (a page of 25 rows
    costs one query, not one per row)."""
    results = list(results)
    events: dict[tuple[int, int], list[AnnotationEvent]] = {}
    if results:
        query = (
            select(AnnotationEvent)
            .options(selectinload(AnnotationEvent.user))
            .where(AnnotationEvent.prediction_id.in_({r.prediction_id for r in results}))
        )
        for event in db.session.scalars(query):
            events.setdefault((event.prediction_id, event.taxonomy_id), []).append(event)
    views = {}
    for result in results:
        own = events.get((result.prediction_id, result.taxonomy_id), [])
        reviewers = {e.user.name for e in active_events(own) if e.kind in REVIEW_KINDS and e.user}
        labels, model, status = current_labels(result, own), mapped_result(result).labels, review_status(own)
        guessed = result.best_guess and status is None and sorted(labels) == sorted(model)
        views[result.id] = LabelView(result.taxonomy_id, labels, model, status, sorted(reviewers), guessed)
    return views


def _undone_roots() -> Select:
    """Ids of the non-undo events an active undo reverses, in SQL (a recursive query, the same on SQLite and
    PostgreSQL). Undos form chains E <- U1 <- U2 ...; E is undone when its chain has an odd length."""
    target = aliased(AnnotationEvent)
    base = (
        select(AnnotationEvent.id.label("id"), AnnotationEvent.undoes_id.label("root"), literal(1).label("depth"))
        .join(target, target.id == AnnotationEvent.undoes_id)
        .where(AnnotationEvent.kind == "undo", target.kind != "undo")
        .cte(recursive=True)
    )
    chain = base.union_all(
        select(AnnotationEvent.id, base.c.root, base.c.depth + 1)
        .join(base, AnnotationEvent.undoes_id == base.c.id)
        .where(AnnotationEvent.kind == "undo")
    )
    lengths = select(chain.c.root, func.max(chain.c.depth).label("n")).group_by(chain.c.root).subquery()
    return select(lengths.c.root).where(lengths.c.n % 2 == 1)


def has_active_event(
    prediction_id: Any, taxonomy_id: Any = None, kinds: Iterable[str] = REVIEW_KINDS, user_id: int | None = None
) -> ColumnElement[bool]:
    """SQL: the prediction (in the taxonomy, when given; by the user, when given) has an active event of one of
    ``kinds``. With the default kinds: it is reviewed."""
    clause = exists().where(AnnotationEvent.prediction_id == prediction_id, *_active(kinds))
    if taxonomy_id is not None:
        clause = clause.where(AnnotationEvent.taxonomy_id == taxonomy_id)
    if user_id is not None:
        clause = clause.where(AnnotationEvent.user_id == user_id)
    return clause


def reviewed_predictions(taxonomy_id: int | None = None, of: Any = None) -> Select:
    """Ids of the predictions reviewed (an active accept, correction or adjudication) in the taxonomy, or in some
    taxonomy when None; of ``of`` only, when given (a correlated test, an index probe)."""
    found = select(AnnotationEvent.prediction_id).where(*_active(REVIEW_KINDS))
    if taxonomy_id is not None:
        found = found.where(AnnotationEvent.taxonomy_id == taxonomy_id)
    return found if of is None else found.where(AnnotationEvent.prediction_id == of)


def _active(kinds: Iterable[str]) -> tuple[ColumnElement[bool], ...]:
    return AnnotationEvent.kind.in_(list(kinds)), AnnotationEvent.id.not_in(_undone_roots())


# What a curator's own review is (several curators per item, webapp/curation/agreement.py): an adjudication is not one.
CURATOR_REVIEW_KINDS = ("correction", "accepted")


def reviewer_count(prediction_id: Any, taxonomy_id: Any) -> ScalarSelect[int]:
    """SQL: how many distinct curators reviewed the prediction in the taxonomy (an active accept or correction)."""
    return (
        select(func.count(distinct(AnnotationEvent.user_id)))
        .where(
            AnnotationEvent.prediction_id == prediction_id,
            AnnotationEvent.taxonomy_id == taxonomy_id,
            AnnotationEvent.kind.in_(CURATOR_REVIEW_KINDS),
            AnnotationEvent.id.not_in(_undone_roots()),
        )
        .scalar_subquery()
    )


@dataclass(frozen=True)
class MappedResult:
    """What a model said, in today's label names: predicted labels (best first), every label's score and
    threshold."""

    labels: list[str]
    scores: dict[str, float]
    thresholds: dict[str, float]


def mapped_result(result: PredictionResult) -> MappedResult:
    labels_map = label_map(result.taxonomy_id)
    if not labels_map:
        return MappedResult(list(result.labels), dict(result.scores), dict(result.thresholds))
    text = prediction_text(result.prediction)
    pairs = labels_map.map_scores(result.scores, result.thresholds, text)
    labels = sorted(labels_map.map_labels(result.labels, text), key=lambda label: -pairs.get(label, (0.0, 0.0))[0])
    return MappedResult(
        labels, {label: s for label, (s, _) in pairs.items()}, {label: t for label, (_, t) in pairs.items()}
    )


def prediction_texts(ids: Iterable[int]) -> dict[int, str]:
    """Prediction id -> its text, fetched in chunks (a database limits the parameters of one query)."""
    ids, texts = sorted(set(ids)), {}
    for start in range(0, len(ids), 500):
        rows = db.session.execute(
            select(Prediction.id, Prediction.title, Prediction.abstract).where(
                Prediction.id.in_(ids[start : start + 500])
            )
        )
        texts.update({pid: compose_text(title, abstract) for pid, title, abstract in rows})
    return texts


LabelRows = type[PredictedLabel] | type[CurrentLabel]


def results_with_label(
    label: str, rows: LabelRows = PredictedLabel, *, of: Any = None, taxonomy_ids: list[int] | None = None
) -> Select:
    """Ids of the prediction results whose label rows (the model's, or the current ones of corrected results) read
    as ``label`` now, whatever name they were stored under (the history and review queue filters). Narrowed to
    ``taxonomy_ids`` and to prediction ``of`` (a correlated test: one index probe per prediction) when given."""
    changed = list(
        db.session.scalars(select(LabelChange.taxonomy_id).where(LabelChange.undone_at.is_(None)).distinct())
    )
    conditions = [and_(rows.taxonomy_id.not_in(changed), rows.label == label)]
    for taxonomy_id in changed:
        names, by_text = label_map(taxonomy_id).sources(label)
        if by_text:  # a keyword split: the paper's text decides which target a stored label became
            conditions.append(rows.result_id.in_(_routed_to(label, taxonomy_id, names, rows)))
        else:
            conditions.append(and_(rows.taxonomy_id == taxonomy_id, rows.label.in_(sorted(names))))
    found = select(rows.result_id).where(or_(*conditions))
    if taxonomy_ids is not None:
        found = found.where(rows.taxonomy_id.in_(taxonomy_ids))
    if of is not None:
        found = found.where(rows.prediction_id == of).correlate_except(rows)
    return found


def labelled_selects(label: str, **narrowed: Any) -> tuple[Select, Select]:
    """The two parts of :func:`results_labelled` (``narrowed``: as :func:`results_with_label` takes), each a select
    of ``(result id, prediction id)``."""
    corrected = exists().where(
        AnnotationEvent.prediction_id == PredictedLabel.prediction_id,
        AnnotationEvent.taxonomy_id == PredictedLabel.taxonomy_id,
        AnnotationEvent.kind.in_(LABEL_KINDS),
    )
    model = results_with_label(label, **narrowed).where(~corrected).add_columns(PredictedLabel.prediction_id)
    curated = results_with_label(label, CurrentLabel, **narrowed).add_columns(CurrentLabel.prediction_id)
    return model, curated


def results_labelled(label: str, **narrowed: Any) -> CompoundSelect:
    """Ids of the prediction results whose *current* labels include ``label``: the model's labels where no curator
    corrected the result, the ``current_labels`` rows (kept by the review command) where one did; so a label a
    curator added finds the result and one they removed does not, in one indexed query. A union, not an OR of two
    IN lists: PostgreSQL tests an OR row by row over every result (0.4 s at 100,000 predictions, bench/scale.py).
    ``narrowed``: as :func:`results_with_label` takes."""
    return union_all(
        *(part.with_only_columns(part.selected_columns[0]) for part in labelled_selects(label, **narrowed))
    )


def store_current_labels(result: PredictionResult, events: list[AnnotationEvent]) -> None:
    """Rewrite the ``current_labels`` rows of a result after a correction or an undo (in the caller's
    transaction): the labels :func:`current_labels` gives now."""
    db.session.execute(delete(CurrentLabel).where(CurrentLabel.result_id == result.id))
    db.session.add_all(
        CurrentLabel(
            result_id=result.id, prediction_id=result.prediction_id, taxonomy_id=result.taxonomy_id, label=label
        )
        for label in current_labels(result, events)
    )


def label_rows(
    taxonomy_id: int, names: Iterable[str] | None = None, rows: LabelRows = PredictedLabel
) -> list[tuple[int, int, str]]:
    """(result id, prediction id, label as stored) of the taxonomy's label rows, of these ``names`` only if given:
    read from the label rows alone, which name their taxonomy."""
    found = select(rows.result_id, rows.prediction_id, rows.label).where(rows.taxonomy_id == taxonomy_id)
    if names is not None:
        found = found.where(rows.label.in_(sorted(names)))
    return [(rid, pid, label) for rid, pid, label in db.session.execute(found)]


def _routed_to(label: str, taxonomy_id: int, names: set[str], rows: LabelRows) -> list[int]:
    found = label_rows(taxonomy_id, names, rows)
    texts = prediction_texts(pid for _, pid, _ in found)
    labels_map = label_map(taxonomy_id)
    return sorted({rid for rid, pid, stored in found if label in labels_map.map_label(stored, texts[pid])})


@dataclass
class _StoredLabels:
    """One app's reading of the (taxonomy id, label) pairs in ``predicted_labels``, up to row ``high``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    high: int | None = None
    pairs: set[tuple[int, str]] = field(default_factory=set)


STORED_LABELS_KEY = "papertag.stored_labels"
# Rows read again at every look: a writer may commit a lower id after a higher one was read (a 64-abstract call
# stores about 300). Kept small: they are read again by key.
LATE_LABEL_ROWS = 1_000


def stored_label_pairs() -> set[tuple[int, str]]:
    """(taxonomy id, label) of every predicted-label row: the labels the history holds, as stored. Reading them all
    is a scan of ``predicted_labels`` (0.7 s at a million predictions, bench/scale.py), so each app reads them once
    and then only the rows stored since, plus the last ``LATE_LABEL_ROWS`` again. Rows are never deleted."""
    stored: _StoredLabels = current_app.extensions.setdefault(STORED_LABELS_KEY, _StoredLabels())
    with stored.lock:
        high = db.session.scalar(select(func.max(PredictedLabel.id))) or 0
        after = -1 if stored.high is None else stored.high - LATE_LABEL_ROWS
        rows = db.session.execute(
            select(PredictedLabel.taxonomy_id, PredictedLabel.label)
            .where(PredictedLabel.id > after, PredictedLabel.id <= high)
            .distinct()
        )
        stored.pairs.update((taxonomy_id, label) for taxonomy_id, label in rows)
        stored.high = high
        return set(stored.pairs)


def known_labels(limit: int = 2000) -> list[str]:
    """Predicted labels found in the history (``limit`` of them at most), in today's names (the filters'
    suggestions)."""
    pairs = sorted(stored_label_pairs())[:limit]
    return sorted({name for taxonomy_id, label in pairs for name in label_map(taxonomy_id).vocabulary([label])})


def event_json(event: AnnotationEvent) -> dict[str, Any]:
    """One event as the API and the exports show it."""
    return {
        "id": event.id,
        "user": event.user.name if event.user else None,
        "created_at": event.created_at.isoformat() + "Z",
        "kind": event.kind,
        "undoes": event.undoes_id,
        "added": event.added,
        "removed": event.removed,
        "note": event.note,
    }


def label_decisions(taxonomy_id: int) -> dict[str, str | None]:
    """Proposed label -> the label training uses (its final name), or None while pending or when rejected."""
    rows = db.session.execute(
        select(LabelProposal.label, LabelProposal.status, LabelProposal.final_label).where(
            LabelProposal.taxonomy_id == taxonomy_id
        )
    )
    return {label: (final if status == "accepted" else None) for label, status, final in rows}


def trainable_labels(labels: list[str], decisions: dict[str, str | None]) -> list[str]:
    """Current labels as training sees them: renamed proposals under their final name, undecided or
    rejected proposals left out (the taxonomy only grows by an admin's accept)."""
    return sorted({decisions.get(label, label) for label in labels} - {None})  # type: ignore[arg-type]


def corrected_predictions(taxonomy_slug: str | None = None) -> Iterator[dict[str, Any]]:
    """One record per (reviewed prediction, taxonomy), oldest first: the ``GET /api/v1/annotations`` lines.
    Accepted items are gold data too; items only skipped, or whose reviews were all undone, are left out."""
    query = (
        select(AnnotationEvent)
        .join(Taxonomy, Taxonomy.id == AnnotationEvent.taxonomy_id)
        .options(selectinload(AnnotationEvent.user))
        .order_by(
            AnnotationEvent.prediction_id, AnnotationEvent.taxonomy_id, AnnotationEvent.created_at, AnnotationEvent.id
        )
    )
    if taxonomy_slug:
        query = query.where(Taxonomy.slug == taxonomy_slug)
    groups: dict[tuple[int, int], list[AnnotationEvent]] = {}
    for event in db.session.scalars(query):
        groups.setdefault((event.prediction_id, event.taxonomy_id), []).append(event)
    slugs = dict(db.session.execute(select(Taxonomy.id, Taxonomy.slug)).all())
    decisions = {taxonomy_id: label_decisions(taxonomy_id) for taxonomy_id in slugs}
    for (prediction_id, taxonomy_id), events in groups.items():
        status = review_status(events)
        if status is None:
            continue
        prediction = db.session.get(Prediction, prediction_id)
        result = next((r for r in prediction.results if r.taxonomy_id == taxonomy_id), None)
        # An accepted proposal's final name may itself have been renamed since: map after the decisions.
        trainable = trainable_labels(current_labels(result, events), decisions[taxonomy_id])
        yield {
            "id": prediction.id,
            "title": prediction.title or "",
            "abstract": prediction.abstract,
            "taxonomy": slugs[taxonomy_id],
            "model_version": result.model_version_id if result else None,
            "predicted": sorted(mapped_result(result).labels) if result else [],
            "labels": label_map(taxonomy_id).map_labels(trainable, prediction_text(prediction)),
            "review": status,
            "events": [event_json(e) for e in events],
        }
