"""Likely label errors (issue 12 point 6): the trainer's ranked file (``python -m trainer label-issues``, cleanlab
over out-of-fold scores) imported as :class:`LabelIssue` rows, and the curators' page listing them lowest quality
first, given labels beside the suggested ones, each linking to the ordinary review page.

The web build never runs cleanlab: the scores come from the trainer. A base-data paper the site has never seen is
stored as a prediction from source ``dataset``: its result holds the labels the data gave and the out-of-fold
scores (the model version recorded is the taxonomy's active one, whose encoder read the paper). Curators then fix it
with ordinary annotation events, which the trainer merges over the base paper by its text (``merge_corrections``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import click
from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request
from flask.cli import with_appcontext
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import selectinload

from ..access.auth import role_required, token_user_role
from ..extensions import csrf, db
from ..history.paging import refuse_past_the_end
from ..json_values import UnstorableJSON
from ..models import DATASET_SOURCE, AnnotationEvent, LabelIssue, Prediction, PredictionResult, Taxonomy
from ..request_input import page_number
from ..serving.scoring import InputError, check_submission
from .annotations import current_labels
from .corrections import CorrectionError, check_label

bp = Blueprint("label_issues", __name__, cli_group="labels")
SOURCE_MAX_CHARS = 300
STATES = ("open", "reviewed", "all")
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl")


class IssueFileError(ValueError):
    """An issue file that cannot be imported; the message names the line and the problem. Nothing is stored."""


@dataclass
class IssueRow:
    """One line of the trainer's file, checked."""

    taxonomy: str
    title: str | None
    abstract: str
    given: list[str]
    suggested: list[str]
    quality: float
    source: str
    threshold: float
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(check_submission(self.title, self.abstract).text.encode("utf-8")).hexdigest()


def _unit_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IssueFileError(f"{name} must be a number")
    if not 0 <= value <= 1:
        raise IssueFileError(f"{name} must lie in [0, 1], not {value}")
    return float(value)


def _labels(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise IssueFileError(f"{name} must be a list of labels")
    try:
        return sorted({check_label(label) for label in value})
    except CorrectionError as exc:
        raise IssueFileError(f"{name}: {exc}") from exc


def parse_row(record: Any) -> IssueRow:
    """One record of the file as an :class:`IssueRow`; :class:`IssueFileError` names what is wrong."""
    if not isinstance(record, dict):
        raise IssueFileError("not a JSON object")
    missing = [k for k in ("taxonomy", "abstract", "given", "suggested", "quality", "scores") if k not in record]
    if missing:
        raise IssueFileError(f"missing {', '.join(missing)}")
    try:
        submission = check_submission(record.get("title"), record["abstract"])
    except InputError as exc:
        raise IssueFileError(str(exc)) from exc
    source = record.get("source", "")
    if not isinstance(source, str) or len(source) > SOURCE_MAX_CHARS:
        raise IssueFileError(f"source must be a string of at most {SOURCE_MAX_CHARS} characters")
    scores = record["scores"]
    if not isinstance(scores, dict) or not scores:
        raise IssueFileError("scores must be an object of label -> probability")
    checked = {}
    for label, score in scores.items():
        checked[_labels([label], "scores")[0]] = _unit_number(score, f"scores[{label!r}]")
    if not isinstance(record["taxonomy"], str):
        raise IssueFileError("taxonomy must be a taxonomy slug")
    return IssueRow(
        taxonomy=record["taxonomy"],
        title=submission.title,
        abstract=submission.abstract,
        given=_labels(record["given"], "given"),
        suggested=_labels(record["suggested"], "suggested"),
        quality=_unit_number(record["quality"], "quality"),
        source=source,
        threshold=_unit_number(record.get("threshold", 0.5), "threshold"),
        scores=checked,
    )


def read_issue_file(lines: Iterable[str], max_rows: int) -> list[IssueRow]:
    """Every row of a JSONL issue file, checked before anything is stored."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(rows) >= max_rows:
            raise IssueFileError(f"more than LABEL_ISSUES_MAX_ROWS={max_rows} rows; write fewer with --limit")
        try:
            record = current_app.json.loads(line)  # the request bodies' parser: bounded depth, storable values
        except UnstorableJSON as exc:
            raise IssueFileError(f"line {number}: cannot be stored ({exc})") from exc
        except ValueError as exc:
            raise IssueFileError(f"line {number}: not JSON ({exc})") from exc
        try:
            rows.append(parse_row(record))
        except IssueFileError as exc:
            raise IssueFileError(f"line {number}: {exc}") from exc
    if not rows:
        raise IssueFileError("the file holds no issues")
    return rows


@dataclass
class ImportSummary:
    issues: int
    papers_added: int
    taxonomies: list[str]


def _dataset_prediction(row: IssueRow, taxonomy: Taxonomy) -> Prediction:
    """A base-data paper as a stored prediction: the data's labels and the out-of-fold scores."""
    if taxonomy.active_version_id is None:
        raise IssueFileError(f"taxonomy {taxonomy.slug!r} has no active model version to record the scores under")
    prediction = Prediction(title=row.title, abstract=row.abstract, text_sha256=row.text_sha256, source=DATASET_SOURCE)
    result = PredictionResult(
        taxonomy_id=taxonomy.id,
        model_version_id=taxonomy.active_version_id,
        scores=row.scores,
        labels=row.given,
        thresholds=dict.fromkeys(row.scores, row.threshold),
        margin=min(abs(p - row.threshold) for p in row.scores.values()),
        best_guess=False,
    )
    result.add_label_rows(prediction)
    prediction.results.append(result)
    db.session.add(prediction)
    return prediction


def import_issues(rows: list[IssueRow]) -> ImportSummary:
    """Replace each named taxonomy's queue with ``rows`` in one commit. A paper the site already stores (same text)
    is reused; others are added as dataset predictions. Issue rows are derived data, so an earlier queue of the same
    taxonomy is dropped; predictions and annotation events are never touched."""
    slugs = sorted({row.taxonomy for row in rows})
    taxonomies = {t.slug: t for t in db.session.scalars(select(Taxonomy).where(Taxonomy.slug.in_(slugs)))}
    unknown = [slug for slug in slugs if slug not in taxonomies]
    if unknown:
        raise IssueFileError(f"no taxonomy {', '.join(map(repr, unknown))} here; known: {_known_slugs()}")
    added = 0
    try:
        for taxonomy in taxonomies.values():
            db.session.execute(delete(LabelIssue).where(LabelIssue.taxonomy_id == taxonomy.id))
        seen: dict[tuple[int, int], LabelIssue] = {}
        for row in rows:
            taxonomy = taxonomies[row.taxonomy]
            prediction = db.session.scalar(
                select(Prediction).where(Prediction.text_sha256 == row.text_sha256).order_by(Prediction.id).limit(1)
            )
            if prediction is None:
                prediction = _dataset_prediction(row, taxonomy)
                db.session.flush()
                added += 1
            key = (taxonomy.id, prediction.id)
            if key in seen:  # the same text twice in the data: its lowest quality counts
                seen[key].quality = min(seen[key].quality, row.quality)
                continue
            seen[key] = LabelIssue(
                taxonomy_id=taxonomy.id,
                prediction_id=prediction.id,
                quality=row.quality,
                given=row.given,
                suggested=row.suggested,
                source=row.source,
            )
            db.session.add(seen[key])
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return ImportSummary(issues=len(seen), papers_added=added, taxonomies=slugs)


def _known_slugs() -> str:
    return ", ".join(db.session.scalars(select(Taxonomy.slug).order_by(Taxonomy.slug))) or "none"


@bp.cli.command("import-issues")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@with_appcontext
def import_issues_command(path: str) -> None:
    """Import the trainer's likely-label-errors file (python -m trainer label-issues --out FILE)."""
    try:
        with open(path, encoding="utf-8") as handle:
            rows = read_issue_file(handle, current_app.config["LABEL_ISSUES_MAX_ROWS"])
        summary = import_issues(rows)
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except IssueFileError as exc:
        raise click.ClickException(f"{path}: {exc}; nothing was imported") from exc
    click.echo(
        f"{summary.issues} label issues imported for {', '.join(summary.taxonomies)} "
        f"({summary.papers_added} base-data papers added as predictions)"
    )


@bp.post("/api/v1/label-issues")
@csrf.exempt
@token_user_role("admin")
def api_import() -> tuple[Response, int]:
    """The trainer's file as the request body (``application/x-ndjson``): what ``flask labels import-issues``
    does, for a site without a shell (Render) or a trainer on another machine."""
    request.max_content_length = current_app.config["LABEL_ISSUES_MAX_UPLOAD_BYTES"]
    if request.mimetype not in NDJSON_TYPES:
        abort(415, description=f"send the issue file as {' or '.join(NDJSON_TYPES)}")
    try:
        text = request.get_data().decode("utf-8")
    except UnicodeDecodeError:
        abort(400, description="the body is not UTF-8 text")
    try:
        summary = import_issues(read_issue_file(text.splitlines(), current_app.config["LABEL_ISSUES_MAX_ROWS"]))
    except IssueFileError as exc:
        abort(422, description=f"{exc}; nothing was imported")
    return jsonify(asdict(summary)), 201


def _reviewed_clause() -> Any:
    """An issue counts as reviewed once its paper has any annotation event in the issue's taxonomy."""
    return exists().where(
        AnnotationEvent.prediction_id == LabelIssue.prediction_id, AnnotationEvent.taxonomy_id == LabelIssue.taxonomy_id
    )


@bp.get("/label-issues")
@role_required("curator")
def index() -> str:
    """The likely label errors, lowest label quality first."""
    slug = request.args.get("taxonomy", "").strip()
    state = request.args.get("state", "open")
    if state not in STATES:
        abort(400, description=f"state must be one of {', '.join(STATES)}")
    page = page_number()
    query = select(LabelIssue).join(Taxonomy, Taxonomy.id == LabelIssue.taxonomy_id)
    if slug:
        if db.session.scalar(select(Taxonomy.id).where(Taxonomy.slug == slug)) is None:
            abort(404, description=f"there is no taxonomy {slug!r}")
        query = query.where(Taxonomy.slug == slug)
    if state != "all":
        query = query.where(_reviewed_clause() if state == "reviewed" else ~_reviewed_clause())
    pagination = db.paginate(
        query.options(
            selectinload(LabelIssue.prediction).selectinload(Prediction.events),
            selectinload(LabelIssue.prediction).selectinload(Prediction.results),
            selectinload(LabelIssue.taxonomy),
        ).order_by(LabelIssue.quality, LabelIssue.id),
        page=page,
        per_page=current_app.config["HISTORY_PER_PAGE"],
        error_out=False,
    )
    refuse_past_the_end(pagination)
    rows = [_view(issue) for issue in pagination.items]
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    filters = {"taxonomy": slug, "state": state}
    return render_template(
        "label_issues/index.html", pagination=pagination, rows=rows, filters=filters, taxonomies=taxonomies
    )


def _view(issue: LabelIssue) -> dict[str, Any]:
    """What one row of the page shows: given and suggested labels with their difference, and today's labels once
    a curator has reviewed the paper."""
    events = [e for e in issue.prediction.events if e.taxonomy_id == issue.taxonomy_id]
    result = next((r for r in issue.prediction.results if r.taxonomy_id == issue.taxonomy_id), None)
    given, suggested = set(issue.given), set(issue.suggested)
    return {
        "issue": issue,
        "dataset": issue.prediction.source == DATASET_SOURCE,
        "kept": sorted(given & suggested),
        "doubted": sorted(given - suggested),
        "missing": sorted(suggested - given),
        "reviewed": bool(events),
        "now": current_labels(result, events) if events else None,
    }
