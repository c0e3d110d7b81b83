"""Corrections: the current gold labels derived from the append-only annotation events.

The original prediction is never changed; a prediction's current labels in a taxonomy are what its model
predicted, with each event's added and removed labels applied in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from .extensions import db
from .models import AnnotationEvent, LabelProposal, Prediction, PredictionResult, Taxonomy


def current_labels(result: PredictionResult | None, events: list[AnnotationEvent]) -> list[str]:
    """Predicted labels with the events applied in order (events must belong to the result's taxonomy)."""
    labels = list(result.labels) if result is not None else []
    for event in sorted(events, key=lambda e: (e.created_at, e.id)):
        labels = [label for label in labels if label not in set(event.removed)]
        labels += [label for label in event.added if label not in labels]
    return sorted(labels)


def event_json(event: AnnotationEvent) -> dict[str, Any]:
    """One event as the API and the exports show it."""
    return {
        "id": event.id,
        "user": event.user.name if event.user else None,
        "created_at": event.created_at.isoformat() + "Z",
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
    """One record per (corrected prediction, taxonomy), oldest first: the ``GET /api/v1/annotations`` lines."""
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
        prediction = db.session.get(Prediction, prediction_id)
        result = next((r for r in prediction.results if r.taxonomy_id == taxonomy_id), None)
        yield {
            "id": prediction.id,
            "title": prediction.title or "",
            "abstract": prediction.abstract,
            "taxonomy": slugs[taxonomy_id],
            "model_version": result.model_version_id if result else None,
            "predicted": sorted(result.labels) if result else [],
            "labels": trainable_labels(current_labels(result, events), decisions[taxonomy_id]),
            "events": [event_json(e) for e in events],
        }
