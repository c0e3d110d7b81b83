"""The JSON API (``/api/v1``) and ``/healthz``. Errors are ``{"error": "..."}`` with a 4xx/5xx status."""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Blueprint, Response, abort, current_app, g, jsonify, request
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from .access.auth import bearer_token, token_user_role
from .access.read_access import PEOPLE, may_read
from .admin import activate_confirmed
from .curation.annotations import corrected_predictions, event_json, label_map
from .curation.corrections import (
    ACTIONS,
    LABEL_ACTIONS,
    CorrectionError,
    ReviewCommand,
    ReviewConflict,
    ReviewForbidden,
    ReviewPart,
    accepted_labels,
)
from .extensions import db, limiter
from .history.exports import download
from .labels import (
    SurgeryError,
    change_json,
    change_log_json,
    change_or_404,
    check_change,
    preview,
    record_change,
    undo_change,
)
from .models import ModelVersion, Prediction, Taxonomy
from .request_input import ID_MAX
from .serving.bundle import BundleError
from .serving.registry import get_taxonomy, import_bundle, list_versions, live_models, version_archive
from .serving.scoring import (
    InputError,
    NoModelError,
    Submission,
    check_submission,
    chosen_models,
    predict_and_store,
    prediction_json,
)
from .training_runs import RunFieldError, RunStateError, claim_next, create_run, get_run, run_json, update_run

bp = Blueprint("api", __name__, url_prefix="/api/v1")
health_bp = Blueprint("health", __name__)


def predict_rate_limit() -> str:
    """Token callers have their own, larger bucket (the limiter keys them by token, see ``auth.client_key``)."""
    key = "TOKEN_PREDICT_RATE_LIMIT" if bearer_token() is not None else "PREDICT_RATE_LIMIT"
    return current_app.config[key]


def json_body() -> Any:
    if not request.is_json:
        abort(415, description="send the body as JSON with Content-Type: application/json")
    body = request.get_json()  # invalid or too deeply nested JSON: a 400 saying why (request_input.CheckedRequest)
    if body is None:
        abort(400, description="the body is JSON null; send an object")
    return body


def json_flag(body: dict[str, Any], key: str) -> bool:
    """An optional flag of a JSON body: absent is false; anything but true or false is a 400 naming it (``1``
    or ``"yes"`` must not silently mean one thing or the other, e.g. apply a change meant as a preview)."""
    value = body.get(key, False)
    if not isinstance(value, bool):
        abort(400, description=f'"{key}" must be true or false, not {json.dumps(value)[:40]}')
    return value


def _submissions(body: Any) -> list[Submission]:
    """``{"title", "abstract"}`` or ``{"abstracts": [...]}`` -> checked submissions (every error is a 400)."""
    if not isinstance(body, dict):
        abort(400, description='send an object: {"title": ..., "abstract": ...} or {"abstracts": [...]}')
    if "abstracts" in body:
        if "abstract" in body:
            abort(400, description='send either "abstract" or "abstracts", not both')
        items = body["abstracts"]
        if not isinstance(items, list):
            abort(400, description='"abstracts" must be a list of {"title", "abstract"} objects')
        if not items:
            abort(400, description='"abstracts" is empty')
        limit = current_app.config["MAX_BATCH"]
        if len(items) > limit:
            abort(400, description=f'"abstracts" has {len(items)} items; at most {limit} are allowed per call')
        where = [f"abstracts[{i}]" for i in range(len(items))]
    else:
        items, where = [body], [""]
    submissions = []
    for item, place in zip(items, where, strict=True):
        if not isinstance(item, dict):
            abort(400, description=f'{place or "body"} must be an object with "abstract" (and optional "title")')
        try:
            submissions.append(check_submission(item.get("title"), item.get("abstract")))
        except InputError as exc:
            abort(400, description=f"{place}.{exc}" if place else str(exc))
    return submissions


@bp.post("/predict")
@limiter.limit(predict_rate_limit)
def predict() -> Response:
    body = json_body()
    submissions = _submissions(body)
    try:
        models = chosen_models(body.get("taxonomies"))
        predictions = predict_and_store(submissions, source="api", models=models, commit=False)
    except InputError as exc:
        abort(400, description=str(exc))
    except NoModelError as exc:
        abort(503, description=str(exc))
    # The answer is read from the rows just flushed, before the commit expires them (read back after it, they would
    # be loaded again from the database: a few milliseconds of every predict call).
    slugs = {model.taxonomy_id: slug for slug, model in models.items()}
    answers = [prediction_json(p, slugs) for p in predictions]
    db.session.commit()
    # A taxonomy whose model failed on this request is named with the reason; the others' answers are stored.
    failed = {"errors": predictions.errors} if predictions.errors else {}
    return jsonify(predictions=answers, **failed)


@bp.get("/taxonomies")
def taxonomies() -> Response:
    rows = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug))
    out = []
    for taxonomy in rows:
        active = db.session.get(ModelVersion, taxonomy.active_version_id) if taxonomy.active_version_id else None
        out.append(
            {
                "slug": taxonomy.slug,
                "name": taxonomy.name,
                "active_version": taxonomy.active_version_id,
                # In today's names (label surgery: /api/v1/taxonomies/<slug>/label-changes).
                "labels": label_map(taxonomy.id).vocabulary(active.labels) if active else [],
                # Proposed labels an admin accepted: the next training run's label set includes them.
                "accepted_labels": label_map(taxonomy.id).vocabulary(accepted_labels(taxonomy)),
                "versions": [v.id for v in taxonomy.versions],
            }
        )
    return jsonify(taxonomies=out)


@bp.get("/taxonomies/<slug>/label-changes")
def label_changes(slug: str) -> Response:
    """The label set now, every label change (undone ones too) and the compiled rules the trainer applies."""
    return jsonify(change_log_json(get_taxonomy(slug)))


@bp.post("/taxonomies/<slug>/label-changes")
@token_user_role("admin")
def make_label_change(slug: str) -> tuple[Response, int]:
    """``{"kind": "rename", "from", "to"}``, ``{"kind": "merge", "sources", "into"}`` or ``{"kind": "split",
    "label", "targets": [{"name", "keywords"}]}`` with an optional ``"note"``; ``"preview": true`` answers what
    the change would touch and stores nothing."""
    taxonomy = get_taxonomy(slug)
    body = json_body()
    if not isinstance(body, dict):
        abort(400, description='send an object such as {"kind": "rename", "from": "...", "to": "..."}')
    kind = body.get("kind")
    try:
        if json_flag(body, "preview"):
            checked = check_change(taxonomy, kind, body)
            return jsonify(kind=kind, payload=checked, preview=preview(taxonomy, kind, checked)), 200
        made = record_change(taxonomy, kind, body, actor=f"api:{g.api_user.name}", note=body.get("note", ""))
    except SurgeryError as exc:
        db.session.rollback()
        abort(400, description=str(exc))
    return jsonify(change_json(made)), 201


@bp.post("/taxonomies/<slug>/label-changes/<int:change_id>/undo")
@token_user_role("admin")
def undo_label_change(slug: str, change_id: int) -> Response:
    """Mark a change undone; 409 while a later change or a correction depends on it."""
    made = change_or_404(get_taxonomy(slug), change_id)
    try:
        undo_change(made, actor=f"api:{g.api_user.name}")
    except SurgeryError as exc:
        db.session.rollback()
        abort(409, description=str(exc))
    return jsonify(change_json(made))


def _version_json(version: ModelVersion) -> dict[str, Any]:
    test = version.test_metrics
    return {
        "id": version.id,
        "taxonomy": version.taxonomy.slug,
        "active": version.taxonomy.active_version_id == version.id,
        "labels": len(version.labels),
        "sha256": version.artifact_sha256,
        "created_at": version.created_at.isoformat() + "Z",
        "imported_by": version.imported_by if may_read(PEOPLE) else None,  # names are never public
        "status": version.status,
        "validation_error": version.validation_error,
        "metrics": {k: test[k] for k in ("micro_f1", "macro_f1") if k in test},
    }


@bp.get("/models")
def models() -> Response:
    return jsonify(models=[_version_json(v) for v in list_versions(request.args.get("taxonomy") or None)])


@bp.post("/models")
@token_user_role("admin")
def upload_model() -> tuple[Response, int]:
    """Upload a bundle ``.tar.gz`` as the multipart field ``bundle`` (or as the raw body)."""
    request.max_content_length = current_app.config["MAX_BUNDLE_UPLOAD_BYTES"]
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("bundle")
        if upload is None:
            abort(400, description='send the bundle .tar.gz as the multipart file field "bundle"')
        data = upload.read()
    elif request.mimetype in {"application/gzip", "application/x-gzip", "application/octet-stream"}:
        data = request.get_data()
    else:
        abort(415, description='send multipart/form-data with a "bundle" file, or an application/gzip body')
    if not data:
        abort(400, description="the uploaded bundle is empty")
    try:
        result = import_bundle(data, actor=f"api:{g.api_user.name}")
    except BundleError as exc:
        abort(422, description=f"bundle refused: {exc}")
    body = _version_json(result.version) | {"created": result.created}
    return jsonify(body), 201 if result.created else 200


@bp.post("/models/<version_id>/activate")
@token_user_role("admin")
def activate_model(version_id: str) -> Response:
    """Activate a version. One that failed its promotion gate needs ``{"confirm": true}``: without it, a 409
    naming the gate's figures (issue 12 point 7); the body is optional otherwise."""
    body = json_body() if request.get_data() else {}
    if not isinstance(body, dict):
        abort(400, description='send an object: {"confirm": true}')
    confirmed = json_flag(body, "confirm")
    return jsonify(_version_json(activate_confirmed(version_id, confirmed=confirmed, actor=f"api:{g.api_user.name}")))


@bp.get("/models/<version_id>/bundle")
@token_user_role("curator")
def download_model(version_id: str) -> Response:
    """The version's bundle ``.tar.gz``, byte for byte as stored (its sha256 is the artifact address)."""
    response = Response(version_archive(version_id), mimetype="application/gzip")
    response.headers["Content-Disposition"] = f'attachment; filename="{version_id}.tar.gz"'
    return response


@bp.get("/annotations")
@token_user_role("curator")
def annotations() -> Response:
    """JSON Lines, one line per corrected prediction and taxonomy (optionally ``?taxonomy=slug``)."""
    slug = request.args.get("taxonomy") or None
    if slug and db.session.scalar(select(Taxonomy.id).where(Taxonomy.slug == slug)) is None:
        abort(404, description=f"no taxonomy {slug!r}")
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in corrected_predictions(slug)]
    return Response(lines, mimetype="application/x-ndjson")


@bp.get("/<any(predictions, annotations):kind>.<fmt>")
@token_user_role("curator")
def export(kind: str, fmt: str) -> Response:
    """``predictions.jsonl|csv`` and ``annotations.jsonl|csv``, streamed (optionally ``?taxonomy=slug``)."""
    return download(kind, fmt, request.args.get("taxonomy") or None)


def _string_list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        abort(400, description=f'"{key}" must be a list of label strings')
    return value


def _event_id(body: dict[str, Any], key: str, action: str, goes_with: str) -> int | None:
    """An optional event id field that goes with one action; anything else is a 400 naming the field."""
    value = body.get(key)
    if value is None:
        return None
    if action != goes_with or not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= ID_MAX:
        abort(400, description=f'"{key}" is an event id (a whole number), and only with "action": "{goes_with}"')
    return value


@bp.post("/predictions/<int:prediction_id>/annotations")
@token_user_role("curator")
def annotate(prediction_id: int) -> tuple[Response, int]:
    """Review one taxonomy of a prediction: ``{"taxonomy": slug, "action": "correct" | "accept" | "skip" | "undo",
    ...}``. ``correct`` (the default) takes ``"labels"`` (the full new set), ``"propose"`` and ``"note"``; the
    event holds the difference to the current labels. ``accept`` and ``skip`` take a ``"note"``, ``accept`` also
    ``"based_on"`` (the latest event the caller saw: a 409 when the labels changed since, as on the review page);
    ``undo`` an ``"event"`` id (default: the caller's latest event there). 201 when an event was recorded."""
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("taxonomy"), str):
        abort(400, description='send {"taxonomy": "<slug>", "action": "correct", "labels": [...], "note": "..."}')
    action = body.get("action", "correct")
    if not isinstance(action, str) or action not in ACTIONS:
        abort(400, description=f'"action" must be one of {", ".join(ACTIONS)}')
    if action in LABEL_ACTIONS and "labels" not in body:
        abort(400, description=f'"labels" is missing: the action "{action}" sends the full new label set')
    if action not in LABEL_ACTIONS and ("labels" in body or "propose" in body):
        abort(400, description=f'"labels" and "propose" go with the actions correct and adjudicate, not "{action}"')
    event = _event_id(body, "event", action, "undo")
    based_on = _event_id(body, "based_on", action, "accept")
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == body["taxonomy"]))
    if taxonomy is None:
        abort(404, description=f"there is no taxonomy {body['taxonomy']!r}")
    part = ReviewPart(
        taxonomy,
        action,
        labels=_string_list(body, "labels") if "labels" in body else None,
        note=body.get("note", ""),
        propose=_string_list(body, "propose"),
        undo_event=event,
        based_on=based_on,
    )
    try:
        (outcome,) = ReviewCommand(prediction, g.api_user, [part]).run()
    except ReviewForbidden as exc:
        db.session.rollback()
        abort(403, description=str(exc))
    except ReviewConflict as exc:  # the labels now and the event to base the next accept on, to check and resend
        (state,) = exc.stale
        answer = jsonify(error=str(exc), labels=state.labels, based_on=state.latest_event_id)
        db.session.rollback()
        return answer, 409
    except CorrectionError as exc:
        db.session.rollback()
        abort(400, description=str(exc))
    state = outcome.state
    return jsonify(
        id=prediction.id,
        taxonomy=taxonomy.slug,
        action=outcome.action,
        recorded=outcome.event is not None,
        event=event_json(outcome.event) if outcome.event is not None else None,
        review=state.status,
        predicted=sorted(state.model_labels),
        labels=state.labels,
        events=[event_json(e) for e in state.events],
        proposed=[p.label for p in outcome.proposals],
    ), (201 if outcome.event is not None else 200)


@bp.post("/training-runs")
@token_user_role("admin")
def start_training_run() -> tuple[Response, int]:
    """The trainer announces a run it is starting (``{"taxonomy": slug, "config": {...}}``)."""
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("taxonomy"), str):
        abort(400, description='send {"taxonomy": "<slug>", "config": {...}}')
    config = body.get("config") or {}
    if not isinstance(config, dict):
        abort(400, description='"config" must be an object')
    run = create_run(body["taxonomy"], config, requested_by=f"api:{g.api_user.name}")
    return jsonify(run_json(run)), 201


@bp.post("/training-runs/claim")
@token_user_role("admin")
def claim_training_run() -> tuple[Response, int]:
    """A trainer worker takes the oldest queued run; 204 when there is none."""
    run = claim_next(worker=f"api:{g.api_user.name}")
    if run is None:
        return Response(status=204), 204
    return jsonify(run_json(run)), 200


@bp.get("/training-runs/<int:run_id>")
def training_run(run_id: int) -> Response:
    return jsonify(run_json(get_run(run_id)))


@bp.patch("/training-runs/<int:run_id>")
@token_user_role("admin")
def update_training_run(run_id: int) -> Response:
    body = json_body()
    if not isinstance(body, dict):
        abort(400, description="send an object of progress fields")
    try:
        return jsonify(run_json(update_run(run_id, body)))
    except RunFieldError as exc:
        abort(400, description=str(exc))
    except RunStateError as exc:
        abort(409, description=str(exc))


@health_bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Active versions from the database and what this worker serves; 503 when the database is unreachable."""
    live = live_models()
    try:
        live.ensure_started()
        db.session.execute(text("SELECT 1"))
        active = dict(
            db.session.execute(
                select(Taxonomy.slug, Taxonomy.active_version_id).where(Taxonomy.active_version_id.is_not(None))
            ).all()
        )
    except SQLAlchemyError as exc:
        db.session.rollback()
        return jsonify(status="error", error=f"database unreachable: {exc.__class__.__name__}"), 503
    loaded = live.loaded()
    if loaded == active:
        status = "ok"
    elif any(version in live.errors for version in active.values()):
        status = "degraded"  # an active version failed to load here; the previous one still serves
    else:
        status = "loading"
    body = {
        "status": status,
        "active": active,
        "worker": {
            "pid": os.getpid(),
            "loaded": loaded,
            "errors": dict(live.errors),
            "ort_threads": live.threads,
        },
    }
    if live.last_poll_error:
        body["worker"]["poll_error"] = live.last_poll_error
    return jsonify(body), 200
