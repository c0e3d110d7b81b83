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
from .models import AnnotationEvent, Prediction, PredictionResult, Taxonomy


def current_labels(result: PredictionResult | None, events: list[AnnotationEvent]) -> list[str]:
    """Predicted labels with the events applied in order (events must belong to the result's taxonomy)."""
    labels = list(result.labels) if result is not None else []
    for event in sorted(events, key=lambda e: (e.created_at, e.id)):
        labels = [label for label in labels if label not in set(event.removed)]
        labels += [label for label in event.added if label not in labels]
    return sorted(labels)


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
            "labels": current_labels(result, events),
            "events": [
                {
                    "user": e.user.name if e.user else None,
                    "created_at": e.created_at.isoformat() + "Z",
                    "added": e.added,
                    "removed": e.removed,
                    "note": e.note,
                }
                for e in events
            ],
        }
