"""Exports of predictions and corrections as JSON Lines or CSV, streamed row by row so a large history never
sits in memory. The same downloads serve the Export page (signed in) and the API (token)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Blueprint, Response, abort, render_template, request, stream_with_context
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from ..access.auth import role_required
from ..csv_cells import csv_lines
from ..curation.annotations import corrected_predictions, current_labels, mapped_result, review_status
from ..extensions import db
from ..models import Prediction, PredictionResult, Taxonomy

bp = Blueprint("exports", __name__)

KINDS = ("predictions", "annotations")
FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv"}
# Labels inside one CSV cell; the trainer's CSV reader splits on it too.
CSV_LABEL_SEPARATOR = "|"


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def prediction_records(taxonomy_slug: str | None = None) -> Iterator[dict[str, Any]]:
    """Every prediction, oldest first: per taxonomy what the model said and the current (corrected) labels."""
    stmt = (
        select(Prediction)
        .options(
            selectinload(Prediction.results).selectinload(PredictionResult.taxonomy), selectinload(Prediction.events)
        )
        .order_by(Prediction.id)
        .execution_options(yield_per=200)
    )
    if taxonomy_slug:
        stmt = stmt.where(
            Prediction.id.in_(
                select(PredictionResult.prediction_id).join(Taxonomy).where(Taxonomy.slug == taxonomy_slug)
            )
        )
    for prediction in db.session.scalars(stmt):
        results = {}
        for result in prediction.results:
            if taxonomy_slug and result.taxonomy.slug != taxonomy_slug:
                continue
            events = [e for e in prediction.events if e.taxonomy_id == result.taxonomy_id]
            mapped = mapped_result(result)
            status = review_status(events)
            results[result.taxonomy.slug] = {
                "model_version": result.model_version_id,
                "predicted": sorted(mapped.labels),
                "labels": current_labels(result, events),
                "reviewed": status is not None,
                "review": status,  # "accepted", "corrected" or None
                "scores": mapped.scores,
            }
        yield {
            "id": prediction.id,
            "title": prediction.title or "",
            "abstract": prediction.abstract,
            "source": prediction.source,
            "batch_id": prediction.batch_id,
            "created_at": _iso(prediction.created_at),
            "results": results,
        }


def _prediction_rows(records: Iterable[dict[str, Any]], slugs: list[str]) -> Iterator[list[Any]]:
    """CSV rows: the paper, then per taxonomy its predicted labels, its current labels and its review."""
    yield ["id", "created_at", "source", "batch_id", "title", "abstract"] + [
        f"{slug}.{part}" for slug in slugs for part in ("predicted", "labels", "review")
    ]
    for r in records:
        row = [r["id"], r["created_at"], r["source"], r["batch_id"] or "", r["title"], r["abstract"]]
        for slug in slugs:
            result = r["results"].get(slug, {})
            row += [
                CSV_LABEL_SEPARATOR.join(result.get("predicted", [])),
                CSV_LABEL_SEPARATOR.join(result.get("labels", [])),
                result.get("review") or "",
            ]
        yield row


def _annotation_rows(records: Iterable[dict[str, Any]]) -> Iterator[list[Any]]:
    """CSV rows the trainer can read (id, title, abstract, labels) plus who corrected what and why."""
    yield [
        "id",
        "taxonomy",
        "title",
        "abstract",
        "labels",
        "predicted",
        "model_version",
        "reviewers",
        "last_reviewed_at",
        "notes",
        "review",
    ]
    for r in records:
        events = r["events"]
        yield [
            r["id"],
            r["taxonomy"],
            r["title"],
            r["abstract"],
            CSV_LABEL_SEPARATOR.join(r["labels"]),
            CSV_LABEL_SEPARATOR.join(r["predicted"]),
            r["model_version"] or "",
            CSV_LABEL_SEPARATOR.join(dict.fromkeys(e["user"] or "" for e in events)),
            events[-1]["created_at"] if events else "",
            "\n".join(e["note"] for e in events if e["note"]),
            r["review"],
        ]


def download(kind: str, fmt: str, taxonomy_slug: str | None) -> Response:
    """A streamed attachment ``<kind>.<fmt>``; unknown kinds, formats or taxonomies are a 404."""
    if kind not in KINDS or fmt not in FORMATS:
        abort(404, description=f"no export {kind}.{fmt}; there are {', '.join(f'{k}.jsonl|csv' for k in KINDS)}")
    slugs = list(db.session.scalars(select(Taxonomy.slug).order_by(Taxonomy.slug)))
    if taxonomy_slug and taxonomy_slug not in slugs:
        abort(404, description=f"there is no taxonomy {taxonomy_slug!r}")
    records = prediction_records(taxonomy_slug) if kind == "predictions" else corrected_predictions(taxonomy_slug)
    if fmt == "jsonl":
        lines: Iterator[str] = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    elif kind == "predictions":
        lines = csv_lines(_prediction_rows(records, [taxonomy_slug] if taxonomy_slug else slugs))
    else:
        lines = csv_lines(_annotation_rows(records))
    name = f"papertag-{kind}{'-' + taxonomy_slug if taxonomy_slug else ''}.{fmt}"
    response = Response(stream_with_context(lines), mimetype=FORMATS[fmt])
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@bp.get("/export")
@role_required("curator")
def index() -> str:
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    return render_template("exports/index.html", taxonomies=taxonomies, kinds=KINDS, formats=list(FORMATS))


@bp.get("/export/<kind>.<fmt>")
@role_required("curator")
def file(kind: str, fmt: str) -> Response:
    return download(kind, fmt, request.args.get("taxonomy", "").strip() or None)
