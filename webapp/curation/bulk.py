"""Bulk actions (issue 12 point 4): accept, add a label or remove a label on many predictions at once, from the
history, the review queue or ``POST /api/v1/annotations/bulk``.

A bulk action is the review command (corrections.py) applied to each prediction that would change, all in one
transaction: the same rules and the same append-only events as one review, never a second code path. A
prediction that would not change (the label already there, or already absent; labels this curator already
reviewed) is not counted and gets no event. Pages confirm first, saying how many predictions change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response

from ..access.auth import role_required, token_user_role
from ..access.read_access import can_read
from ..api import json_body, json_flag
from ..extensions import db
from ..history import search
from ..history.views import REVIEWED_CHOICES, filtered_predictions, lone_search
from ..models import BatchJob, Prediction, PredictionResult, Taxonomy, User
from ..request_input import ID_MAX, whole_number
from .annotations import CURATOR_REVIEW_KINDS, active_events
from .corrections import (
    CorrectionError,
    ReviewCommand,
    ReviewPart,
    check_label,
    taxonomy_labels,
    taxonomy_state,
)
from .curate import queue_query

bp = Blueprint("bulk", __name__, url_prefix="/curate")
api_bp = Blueprint("bulk_api", __name__, url_prefix="/api/v1")

BULK_ACTIONS = {"accept": "Accept the labels", "add": "Add a label", "remove": "Remove a label"}
# Where a selection comes from: ticked rows (or every row of the page), or everything a filter matches.
SCOPES = ("selected", "page", "filter")
SOURCES = ("history", "queue")
# Predictions listed on the confirmation page (the count covers them all).
SHOWN = 50


class BulkError(CorrectionError):
    """The bulk action cannot run as asked; the message names the problem."""


@dataclass
class BulkPlan:
    """What a bulk action would do: the checked review command of each prediction that changes."""

    taxonomy: Taxonomy
    action: str
    label: str
    ids: list[int]
    commands: list[ReviewCommand] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.commands)

    @property
    def unchanged(self) -> int:
        return len(self.ids) - len(self.commands)

    def summary(self) -> str:
        """The change in words, e.g. "add “NLP” (Research fields) to 12 predictions"."""
        count = f"{self.changed} prediction{'' if self.changed == 1 else 's'}"
        where = f"({self.taxonomy.name})"
        if self.action == "accept":
            return f"accept the labels {where} of {count}"
        return f"{self.action} “{self.label}” {where} {'to' if self.action == 'add' else 'from'} {count}"


def parse_ids(raw: list[str] | str) -> list[int]:
    """Prediction ids from form fields or one comma-separated field, in order, without repeats."""
    parts = raw.split(",") if isinstance(raw, str) else raw
    ids: list[int] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        number = whole_number(part)
        if number is None:
            raise BulkError(f"prediction ids are whole numbers up to {ID_MAX}, not {part[:20]!r}")
        ids.append(number)
    return list(dict.fromkeys(ids))


def plan(user: User, ids: list[int], taxonomy: Taxonomy, action: str, label: object = "") -> BulkPlan:
    """Check the request and every prediction's review command; nothing is recorded."""
    if not isinstance(action, str) or action not in BULK_ACTIONS:
        raise BulkError(f"action must be one of {', '.join(BULK_ACTIONS)}, not {str(action)[:40]!r}")
    if not ids:
        raise BulkError("no prediction selected: tick some rows, or choose all on this page or all matching the filter")
    limit = current_app.config["BULK_MAX"]
    if len(ids) > limit:
        raise BulkError(f"{len(ids)} predictions selected; a bulk action changes at most {limit} at once (BULK_MAX)")
    checked = ""
    if action != "accept":
        typed = check_label(label)
        checked = search.same_label(typed, taxonomy_labels(taxonomy)) or ""  # case and separators aside, as in /history
        if not checked:
            raise BulkError(f"{typed!r} is not a label of {taxonomy.name} ({taxonomy.slug}) as it is named today")
    elif label:
        raise BulkError("accept takes no label: it confirms each prediction's labels as they stand")
    result = BulkPlan(taxonomy, action, checked, ids)
    predictions = {}
    for start in range(0, len(ids), 500):  # a database limits the parameters of one query
        chunk = ids[start : start + 500]
        query = select(Prediction).where(Prediction.id.in_(chunk))
        for prediction in db.session.scalars(
            query.options(selectinload(Prediction.results), selectinload(Prediction.events))
        ):
            predictions[prediction.id] = prediction
    missing = [i for i in ids if i not in predictions]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise BulkError(
            f"{len(missing)} selected prediction{'s do' if len(missing) > 1 else ' does'} not exist: {shown}"
        )
    for prediction_id in ids:
        part = _part(predictions[prediction_id], user, taxonomy, action, checked)
        if part is not None:
            command = ReviewCommand(predictions[prediction_id], user, [part])
            try:
                command.validate()
            except CorrectionError as exc:
                raise BulkError(f"prediction {prediction_id}: {exc}") from exc
            result.commands.append(command)
    return result


def _part(prediction: Prediction, user: User, taxonomy: Taxonomy, action: str, label: str) -> ReviewPart | None:
    """The review one prediction gets, or None where it would not change."""
    state = taxonomy_state(prediction, taxonomy)
    if action == "accept":
        if state.result is None and not state.events:
            return None  # the taxonomy never labelled it: nothing to accept
        if any(e.user_id == user.id and e.kind in CURATOR_REVIEW_KINDS for e in active_events(state.events)):
            return None  # this curator's review stands already
        return ReviewPart(taxonomy, "accept")
    if (label in state.labels) == (action == "add"):
        return None
    labels = [*state.labels, label] if action == "add" else [x for x in state.labels if x != label]
    return ReviewPart(taxonomy, "correct", labels=labels)


def apply(bulk: BulkPlan) -> int:
    """Record every planned event in one transaction (all or nothing); the number of predictions changed."""
    try:
        for command in bulk.commands:
            command.run(commit=False)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return bulk.changed


def filter_ids(form: dict[str, str], user: User) -> list[int]:
    """Every prediction a history or queue filter matches (``f_*`` fields), at most BULK_MAX + 1 of them (one
    more tells the caller the filter matches too many)."""
    source = form.get("source", "")
    if source not in SOURCES:
        raise BulkError(f"source must be one of {', '.join(SOURCES)}, not {source[:20]!r}")
    limit = current_app.config["BULK_MAX"] + 1
    label = form.get("f_label", "").strip()[:300]
    if search.has_control_characters(label):
        raise BulkError("the label filter must not contain control characters")
    taxonomy = form.get("f_taxonomy", "").strip()[:63]
    if taxonomy and db.session.scalar(select(Taxonomy.id).where(Taxonomy.slug == taxonomy)) is None:
        raise BulkError(f"the filter names no taxonomy {taxonomy!r}")
    if source == "queue":
        query = queue_query(taxonomy, label, user.id).with_only_columns(PredictionResult.prediction_id)
        return list(dict.fromkeys(db.session.scalars(query.limit(limit))))
    reviewed, batch = form.get("f_reviewed", ""), form.get("f_batch", "").strip()
    if reviewed not in REVIEWED_CHOICES:
        raise BulkError("the review filter must be 'yes', 'no' or empty")
    batch_id = whole_number(batch) if batch else None
    if batch and batch_id is None:
        raise BulkError(f"the batch filter must be a batch number, not {batch[:20]!r}")
    job = db.session.get(BatchJob, batch_id) if batch_id is not None else None
    if job is not None and not can_read(user, job):
        raise BulkError(f"there is no batch job {batch} you may read")
    version, q = form.get("f_version", "").strip()[:80], form.get("f_q", "").strip()[:200]
    # A search alone: its newest matches, one past the limit at most (ranking every match of a broad one is slow).
    pool = limit if lone_search(q, label, version, reviewed, taxonomy, batch) else None
    query = filtered_predictions(q, label, version, reviewed, job.id if job else None, taxonomy, pool, reach=limit)
    return list(db.session.scalars(query.with_only_columns(Prediction.id).limit(limit)))


def _selected_ids(form: Any, user: User) -> list[int]:
    scope = form.get("scope", "selected")
    if scope not in SCOPES:
        raise BulkError(f"scope must be one of {', '.join(SCOPES)}, not {scope[:20]!r}")
    if scope == "filter":
        return filter_ids(form, user)
    return parse_ids(form.getlist("ids") if scope == "selected" else form.get("page_ids", ""))


def _back_url() -> str:
    """Where the curator came from (a local path only: never an open redirect)."""
    target = request.form.get("next", "")
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("history.index")


def _taxonomy(slug: object) -> Taxonomy:
    if not isinstance(slug, str) or not slug.strip():
        raise BulkError("choose the taxonomy whose labels the action changes")
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == slug.strip()))
    if taxonomy is None:
        raise BulkError(f"there is no taxonomy {slug.strip()[:63]!r}")
    return taxonomy


@bp.post("/bulk")
@role_required("curator")
def confirm() -> Response | tuple[str, int]:
    """Step one (the history's or queue's form): the confirmation page with the counts. Step two (its Confirm
    button, ``confirmed`` = the count shown): apply, unless the counts changed meanwhile (then confirm again)."""
    form = request.form
    try:
        taxonomy = _taxonomy(form.get("taxonomy"))
        ids = parse_ids(form["resolved_ids"]) if "resolved_ids" in form else _selected_ids(form, current_user)
        bulk = plan(current_user, ids, taxonomy, form.get("action", ""), form.get("label", ""))
    except CorrectionError as exc:
        db.session.rollback()
        return render_template("bulk/confirm.html", error=str(exc), back=_back_url(), bulk=None), 400
    confirmed = form.get("confirmed", "")
    if bulk.changed and whole_number(confirmed) == bulk.changed:
        apply(bulk)
        flash(f"Done: {bulk.summary()}; {bulk.unchanged} unchanged.", "info")
        return redirect(_back_url())
    stale = bool(confirmed)  # confirmed a different count: others changed the selection meanwhile
    shown = [c.prediction for c in bulk.commands[:SHOWN]]
    return render_template("bulk/confirm.html", bulk=bulk, shown=shown, stale=stale, back=_back_url(), error=""), 200


@api_bp.post("/annotations/bulk")
@token_user_role("curator")
def api_bulk() -> tuple[Response, int]:
    """``{"taxonomy", "action": "accept" | "add" | "remove", "label", "ids": [...], "dry_run": false}``: the counts,
    and with ``dry_run`` false the events recorded (201 when any)."""
    body = json_body()
    if not isinstance(body, dict):
        abort(400, description='send {"taxonomy": slug, "action": "add", "label": "...", "ids": [1, 2]}')
    unknown = sorted(set(body) - {"taxonomy", "action", "label", "ids", "dry_run"})
    if unknown:
        abort(400, description=f"unknown fields: {', '.join(unknown)[:200]}")
    dry_run = json_flag(body, "dry_run")
    ids = body.get("ids")
    if not isinstance(ids, list) or any(type(i) is not int or not 1 <= i <= ID_MAX for i in ids):
        abort(400, description=f'"ids" must be a list of prediction ids (whole numbers from 1 to {ID_MAX})')
    try:
        taxonomy = _taxonomy(body.get("taxonomy"))
        bulk = plan(g.api_user, list(dict.fromkeys(ids)), taxonomy, body.get("action", ""), body.get("label", ""))
    except CorrectionError as exc:
        db.session.rollback()
        abort(400, description=str(exc))
    events = []
    if not dry_run:
        apply(bulk)
        events = [o.event.id for c in bulk.commands for o in c.validate() if o.event is not None]
    payload = {
        "taxonomy": taxonomy.slug,
        "action": bulk.action,
        "label": bulk.label or None,
        "selected": len(bulk.ids),
        "changed": bulk.changed,
        "unchanged": bulk.unchanged,
        "dry_run": dry_run,
        "changed_ids": [c.prediction.id for c in bulk.commands],
        "events": events,
    }
    return jsonify(payload), (201 if events else 200)
