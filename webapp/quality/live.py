"""Live quality from corrections (issue 6): per label and model version, from reviewed predictions.

Every correction is a diff against what a model version said. A *reviewed* prediction is a (prediction,
taxonomy) with an active review: an accept or a correction not undone (a skip is not a review); its gold labels
are :func:`current_labels`. Per label of the version that made it: predicted and still in gold is a true positive,
predicted and removed a false positive, added and not predicted a false negative, neither predicted nor added a
true negative (so an accepted item counts every label it keeps as a TP and every label the model left out as a
TN). Labels outside the version's label set (proposals) are not counted: the version could not have predicted them.

A label is *flagged* when at least ``QUALITY_MIN_EVIDENCE`` reviewed predictions involve it (TP + FP + FN) and
its live F1 is more than ``QUALITY_DROP_MARGIN`` below its offline test F1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.orm import load_only, selectinload

from ..access.auth import has_role
from ..curation.annotations import (
    REVIEW_KINDS,
    active_events,
    current_labels,
    has_active_event,
    label_map,
    prediction_text,
)
from ..extensions import db
from ..models import DATASET_SOURCE, AnnotationEvent, ModelVersion, Prediction, PredictionResult, Taxonomy
from ..serving.registry import RegistryError, get_taxonomy, get_version

bp = Blueprint("quality", __name__)
api_bp = Blueprint("quality_api", __name__, url_prefix="/api/v1")


@dataclass(frozen=True)
class Review:
    """One reviewed prediction in one taxonomy: what the model said and the labels curators settled on."""

    prediction_id: int
    version_id: str
    scores: dict[str, float]  # empty unless asked for, keyed by the version's own label names
    text: str  # what the model read; label splits route by it
    predicted: frozenset[str]  # in today's label names, like gold
    gold: frozenset[str]
    reviewed_at: datetime  # the latest event: when the gold reached its current state


def reviews(taxonomy_id: int, version_id: str | None = None, *, with_scores: bool = False) -> list[Review]:
    """Every reviewed prediction of a taxonomy (of one version when given), oldest prediction first.

    Scores (a number per label, most of a row's bytes) are read only ``with_scores``; counting needs labels only.
    """
    events: dict[int, list[AnnotationEvent]] = {}
    for event in db.session.scalars(
        select(AnnotationEvent).where(AnnotationEvent.taxonomy_id == taxonomy_id).order_by(AnnotationEvent.id)
    ):
        events.setdefault(event.prediction_id, []).append(event)
    columns = [
        PredictionResult.prediction_id,
        PredictionResult.taxonomy_id,
        PredictionResult.model_version_id,
        PredictionResult.labels,
        *([PredictionResult.score_values, PredictionResult.scores_by_label] if with_scores else []),
    ]
    query = (
        select(PredictionResult)
        # current_labels reads each paper's text (label splits route by it): one query for all, not one each.
        .options(
            load_only(*columns),
            selectinload(PredictionResult.prediction).load_only(Prediction.title, Prediction.abstract),
        )
        .join(Prediction, Prediction.id == PredictionResult.prediction_id)
        .where(
            PredictionResult.taxonomy_id == taxonomy_id,
            has_active_event(PredictionResult.prediction_id, taxonomy_id),
            Prediction.source != DATASET_SOURCE,  # no served model answered a base-data paper
        )
        .order_by(PredictionResult.prediction_id)
    )
    if version_id is not None:
        query = query.where(PredictionResult.model_version_id == version_id)
    # Gold comes back in today's label names (label surgery), so the model's labels are read in them too.
    labels_map = label_map(taxonomy_id)
    out = []
    for result in db.session.scalars(query):
        own, text = events[result.prediction_id], prediction_text(result.prediction)
        reviewed_at = max(e.created_at for e in active_events(own) if e.kind in REVIEW_KINDS)
        out.append(
            Review(
                prediction_id=result.prediction_id,
                version_id=result.model_version_id,
                scores=dict(result.scores) if with_scores else {},
                text=text,
                predicted=frozenset(labels_map.map_labels(result.labels, text)),
                gold=frozenset(current_labels(result, own)),
                reviewed_at=reviewed_at,
            )
        )
    return out


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass
class Counts:
    """True positives, false positives (labels removed), false negatives (labels added) and true negatives
    (labels neither predicted nor added: what an accept confirms the model was right to leave out)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        """The evidence about a label: reviews where it was predicted or is gold (true negatives excluded)."""
        return self.tp + self.fp + self.fn

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


@dataclass
class LabelQuality(Counts):
    label: str = ""
    offline_f1: float | None = None
    flagged: bool = False


@dataclass
class Period:
    start: date
    fp: int = 0
    fn: int = 0


@dataclass
class VersionQuality:
    """One version's live figures from its reviewed predictions, beside the offline test figures."""

    version: ModelVersion
    offline_version: str | None  # whose test metrics are the offline reference (None: no test metrics)
    offline: dict[str, Any]
    reviewed: int
    micro: Counts
    labels: list[LabelQuality]
    timeline: list[Period]
    period: str  # "day" or "week"
    settings: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> list[LabelQuality]:
        return [row for row in self.labels if row.flagged]


def offline_reference(version: ModelVersion) -> tuple[str | None, dict[str, Any]]:
    """The test metrics a version is compared with: its own, or for thresholds learned from reviews (which have
    no test split of their own) those of the version they were derived from."""
    seen = set()
    while version.id not in seen:
        seen.add(version.id)
        if version.test_metrics:
            return version.id, version.test_metrics
        parent = (version.metrics.get("learned_thresholds") or {}).get("derived_from")
        if not parent or db.session.get(ModelVersion, parent) is None:
            break
        version = get_version(parent)
    return None, {}


def timeline(items: list[Review], labels: set[str]) -> tuple[list[Period], str]:
    """False positives and negatives per day (per week, from Monday, when the reviews span over 31 days), dated
    by each review's latest event; empty periods in between are kept so the chart reads as time."""
    if not items:
        return [], "day"
    days = [item.reviewed_at.date() for item in items]
    weekly = (max(days) - min(days)).days > 31
    step = timedelta(days=7 if weekly else 1)

    def start(day: date) -> date:
        return day - timedelta(days=day.weekday()) if weekly else day

    periods: dict[date, Period] = {}
    cursor = start(min(days))
    while cursor <= max(days):
        periods[cursor] = Period(cursor)
        cursor += step
    for item, day in zip(items, days, strict=True):
        period = periods[start(day)]
        period.fp += len((item.predicted - item.gold) & labels)
        period.fn += len((item.gold - item.predicted) & labels)
    return list(periods.values()), "week" if weekly else "day"


def version_quality(version: ModelVersion, items: list[Review]) -> VersionQuality:
    """Counts, live P/R/F1 and flags per label, micro overall and the FP/FN timeline of one version."""
    config = current_app.config
    min_evidence, margin = int(config["QUALITY_MIN_EVIDENCE"]), float(config["QUALITY_DROP_MARGIN"])
    offline_version, offline = offline_reference(version)
    # Rows in today's label names; a label renamed, merged or split since training has no offline figure.
    per_label = offline.get("per_label") or {}
    offline_f1 = {label: (per_label.get(label) or {}).get("f1") for label in version.labels}
    rows = {
        label: LabelQuality(label=label, offline_f1=offline_f1.get(label))
        for label in label_map(version.taxonomy_id).vocabulary(version.labels)
    }
    known = set(rows)
    for item in items:
        predicted, gold = item.predicted & known, item.gold & known
        for label in predicted & gold:
            rows[label].tp += 1
        for label in predicted - gold:
            rows[label].fp += 1
        for label in gold - predicted:
            rows[label].fn += 1
        for label in known - predicted - gold:
            rows[label].tn += 1
    for row in rows.values():
        row.flagged = row.n >= min_evidence and row.offline_f1 is not None and (row.f1 or 0.0) < row.offline_f1 - margin
    micro = Counts(*(sum(getattr(row, kind) for row in rows.values()) for kind in ("tp", "fp", "fn", "tn")))
    periods, period = timeline(items, known)
    return VersionQuality(
        version=version,
        offline_version=offline_version,
        offline=offline,
        reviewed=len(items),
        micro=micro,
        labels=sorted((r for r in rows.values() if r.n), key=lambda r: (not r.flagged, -r.n, r.label)),
        timeline=periods,
        period=period,
        settings={"min_evidence": min_evidence, "drop_margin": margin},
    )


def taxonomy_quality(slug: str, version_id: str = "") -> tuple[Taxonomy, VersionQuality | None, dict[str, int]]:
    """A taxonomy, the quality of one of its versions (the active one unless ``version_id``; None when it has
    none) and how many reviewed predictions each of its versions made."""
    taxonomy = get_taxonomy(slug)
    version_id = version_id or taxonomy.active_version_id or ""
    version = get_version(version_id) if version_id else None
    if version is not None and version.taxonomy_id != taxonomy.id:
        raise RegistryError(f"{version_id} is not a version of {slug}")
    items = reviews(taxonomy.id)
    per_version: dict[str, int] = {}
    for item in items:
        per_version[item.version_id] = per_version.get(item.version_id, 0) + 1
    if version is None:
        return taxonomy, None, per_version
    return taxonomy, version_quality(version, [item for item in items if item.version_id == version.id]), per_version


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def quality_json(quality: VersionQuality) -> dict[str, Any]:
    """The API shape: live counts and figures, the offline ones beside them, flags and the timeline."""
    offline, micro = quality.offline, quality.micro
    return {
        "version": quality.version.id,
        "active": quality.version.taxonomy.active_version_id == quality.version.id,
        "reviewed": quality.reviewed,
        "offline_version": quality.offline_version,
        "micro": {
            "tp": micro.tp,
            "fp": micro.fp,
            "fn": micro.fn,
            "tn": micro.tn,
            "precision": _rounded(micro.precision),
            "recall": _rounded(micro.recall),
            "f1": _rounded(micro.f1),
            "offline_precision": offline.get("micro_precision"),
            "offline_recall": offline.get("micro_recall"),
            "offline_f1": offline.get("micro_f1"),
        },
        "flag_rule": quality.settings,
        "labels": [
            {
                "label": row.label,
                "reviewed": row.n,
                "tp": row.tp,
                "fp": row.fp,
                "fn": row.fn,
                "tn": row.tn,
                "precision": _rounded(row.precision),
                "recall": _rounded(row.recall),
                "f1": _rounded(row.f1),
                "offline_f1": row.offline_f1,
                "flagged": row.flagged,
            }
            for row in quality.labels
        ],
        "timeline": {
            "period": quality.period,
            "points": [{"start": p.start.isoformat(), "fp": p.fp, "fn": p.fn} for p in quality.timeline],
        },
    }


# Charts: hand-drawn SVG (presentation attributes only, so the page's CSP needs nothing inline).
CHART_WIDTH = 640
COLORS = {
    "fp": "#c0392b",
    "fn": "#e08e0b",
    "live": "#2f6fde",
    "offline": "#aab3bf",
    "ink": "#5f6b7a",
    "line": "#dde2e8",
}
# Most labels drawn in the live-vs-offline chart (flagged first, then most evidence); the table has them all.
CHART_LABELS = 20


def timeline_chart(quality: VersionQuality) -> dict[str, Any]:
    """Bar geometry for false positives and false negatives per period."""
    left, top, plot_width, plot_height = 40, 28, CHART_WIDTH - 48, 150
    periods = quality.timeline
    highest = max([1] + [max(p.fp, p.fn) for p in periods])
    slot = plot_width / max(1, len(periods))
    every = -(-len(periods) // 8) or 1  # at most 8 dates under the axis
    bars, ticks = [], []
    for i, p in enumerate(periods):
        x = left + i * slot
        for offset, kind, value in ((0.1, "fp", p.fp), (0.5, "fn", p.fn)):
            height = plot_height * value / highest
            y = top + plot_height - height
            bars.append(
                {
                    "x": x + slot * offset,
                    "y": y,
                    "width": slot * 0.4,
                    "height": height,
                    "kind": kind,
                    "value": value,
                    "start": p.start.isoformat(),
                }
            )
        if i % every == 0:
            ticks.append({"x": x + slot / 2, "text": p.start.isoformat()})
    return {
        "width": CHART_WIDTH,
        "height": top + plot_height + 44,
        "left": left,
        "top": top,
        "bottom": top + plot_height,
        "right": left + plot_width,
        "highest": highest,
        "bars": bars,
        "ticks": ticks,
    }


def labels_chart(quality: VersionQuality) -> dict[str, Any]:
    """Paired horizontal bars per label: live F1 over the reviews and offline test F1."""
    left, top, row_height, bar_width = 230, 34, 26, CHART_WIDTH - 230 - 48
    rows = []
    for i, row in enumerate(quality.labels[:CHART_LABELS]):
        y = top + i * row_height
        name = row.label if len(row.label) <= 32 else row.label[:31] + "…"
        bars = [
            {"kind": kind, "y": y + offset, "value": value, "width": bar_width * (value or 0.0)}
            for kind, offset, value in (("live", 2, row.f1), ("offline", 12, row.offline_f1))
        ]
        rows.append({"name": name, "y": y, "flagged": row.flagged, "bars": bars})
    return {
        "width": CHART_WIDTH,
        "height": top + max(1, len(rows)) * row_height + 8,
        "left": left,
        "top": top,
        "bar_width": bar_width,
        "rows": rows,
    }


CHARTS = {"timeline": timeline_chart, "labels": labels_chart}


@bp.get("/models/<slug>/quality")
def page(slug: str) -> str:
    taxonomy, quality, per_version = taxonomy_quality(slug, request.args.get("version", "").strip()[:80])
    return render_template(
        "quality/page.html",
        taxonomy=taxonomy,
        quality=quality,
        per_version=per_version,
        can_learn=has_role(current_user, "admin"),
        min_evidence=current_app.config["THRESHOLD_MIN_EVIDENCE"],
    )


@bp.get("/models/<slug>/quality/<any(timeline, labels):chart>.svg")
def chart(slug: str, chart: str) -> Response:
    _, quality, _ = taxonomy_quality(slug, request.args.get("version", "").strip()[:80])
    if quality is None:
        abort(404, description=f"{slug} has no active model version, so there is nothing to plot")
    svg = render_template(f"quality/{chart}.svg", chart=CHARTS[chart](quality), quality=quality, colors=COLORS)
    return Response(svg, mimetype="image/svg+xml")


@api_bp.get("/taxonomies/<slug>/quality")
def quality_api(slug: str) -> Response:
    """Live quality of the active version (or ``?version=``) from reviewed predictions."""
    taxonomy, quality, per_version = taxonomy_quality(slug, request.args.get("version", "").strip()[:80])
    if quality is None:
        abort(404, description=f"{slug} has no active model version")
    return jsonify({"taxonomy": taxonomy.slug, **quality_json(quality), "reviewed_per_version": per_version})
