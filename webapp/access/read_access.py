"""Who may read what (issue 11 point 12). ``READ_ACCESS`` is "public" or "signed-in"; a reader is the user of
the API token the request presents, else the signed-in user, else anonymous. Every GET route is listed in
:data:`ENDPOINT_READS`, checked by :func:`guard_reads` before its view runs (tests/test_privacy.py fails on a
route missing there), and objects named in the URL are checked one by one with :func:`can_read`.

=====================================  ==========================  ==========================================
What                                   READ_ACCESS = public        READ_ACCESS = signed-in
=====================================  ==========================  ==========================================
predict form, sign-in page, /healthz,  anyone                      anyone
the taxonomies' labels (what the
anonymous predict API answers in)
one prediction: abstract, labels,      anyone                      signed-in users and tokens; anonymous only
scores, explanation                                                 the ones made in its own browser session
all predictions: history, search,      anyone                      signed-in users and tokens
similar past abstracts
models and taxonomies: versions,       anyone                      signed-in users and tokens
metrics, live quality, thresholds
people: who reviewed, notes, who       signed-in users and tokens  signed-in users and tokens
imported/activated a model, label-
change actors (names are never public)
training runs                          signed-in users and tokens  signed-in users and tokens
a batch job (page, status, results,    its creator and admins      its creator and admins
its history filter)
curation, exports, tokens, admin       the view's own role check (curator or admin), as before
=====================================  ==========================  ==========================================

Refusals: anonymous -> the sign-in page (pages) or 401 asking for a token (API); a signed-in user refused an object
-> 404, as if it did not exist (another curator's batch).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, current_app, request, session
from flask_login import current_user

from ..extensions import db, login_manager
from ..models import BatchJob, Prediction, TrainingRun
from .auth import bearer_token, has_role

# Kinds of things read, besides the objects (rows) themselves.
ANYONE = "anyone"
PREDICTIONS = "predictions"
MODELS = "models"
PEOPLE = "people"
# The view checks a role itself (role_required / token_user_role): the guard adds nothing.
ROLE_CHECKED = "role-checked"

ENDPOINT_READS: dict[str, str] = {
    "static": ANYONE,
    "health.healthz": ANYONE,
    "predict.index": ANYONE,
    "accounts.login": ANYONE,
    # The vocabulary the (anonymous) predict API answers in: labels and active versions, nobody's data.
    "api.taxonomies": ANYONE,
    # One prediction: the object check below decides (own results included).
    "history.detail": ANYONE,
    "explain.explanation": ANYONE,
    "history.index": PREDICTIONS,
    # The history label filter's suggestions include labels read off stored predictions: the history's readers.
    "history.label_suggestions": PREDICTIONS,
    "similar.similar": PREDICTIONS,
    "admin.models": MODELS,
    "api.models": MODELS,
    "quality.page": MODELS,
    "quality.chart": MODELS,
    "quality_api.quality_api": MODELS,
    "learned.result": MODELS,
    "api.label_changes": PEOPLE,
    "api.training_run": PEOPLE,
    "accounts.password": ROLE_CHECKED,
    "accounts.tokens": ROLE_CHECKED,
    "admin.training_run": ROLE_CHECKED,
    "agreement.page": ROLE_CHECKED,
    "admin.confirm_activate": ROLE_CHECKED,
    "admin.confirm_rollback": ROLE_CHECKED,
    "admin.training_runs": ROLE_CHECKED,
    "api.annotations": ROLE_CHECKED,
    "api.download_model": ROLE_CHECKED,
    "api.export": ROLE_CHECKED,
    "batch.index": ROLE_CHECKED,
    "batch.detail": ROLE_CHECKED,
    "batch.status": ROLE_CHECKED,
    "batch.results": ROLE_CHECKED,
    "curate.prediction": ROLE_CHECKED,
    "curate.proposals": ROLE_CHECKED,
    "curate.queue": ROLE_CHECKED,
    "exports.file": ROLE_CHECKED,
    "exports.index": ROLE_CHECKED,
    "labels.index": ROLE_CHECKED,
    "label_issues.index": ROLE_CHECKED,
    "replay.show": ROLE_CHECKED,
    "replay.status": ROLE_CHECKED,
    "replay_api.api_job": ROLE_CHECKED,
    "replay_api.api_latest": ROLE_CHECKED,
}

# URL arguments that name an object, checked with can_read whatever the endpoint: the row's model and its name.
OBJECT_ARGS: dict[str, tuple[type, str]] = {
    "prediction_id": (Prediction, "prediction"),
    "job_id": (BatchJob, "batch job"),
    "run_id": (TrainingRun, "training run"),
}

# The anonymous visitor's own results (signed-in mode): the newest ones made from this browser session.
OWN_PREDICTIONS_KEY = "own_predictions"
OWN_PREDICTIONS_KEPT = 20


def reader() -> Any:
    """Who is reading: the API token's user when the request presents a usable token, else ``current_user``
    (a signed-in user, or Flask-Login's anonymous user)."""
    token = bearer_token()
    return token.user if token is not None else current_user


def _signed_in(user: Any) -> bool:
    return bool(user.is_authenticated)


def can_read(user: Any, thing: object) -> bool:
    """The rule table above: may ``user`` (a :class:`User` or Flask-Login's anonymous user) read ``thing``, a
    kind (:data:`PREDICTIONS`, :data:`MODELS`, :data:`PEOPLE`, :data:`ANYONE`) or a row?"""
    public = current_app.config["READ_ACCESS"] == "public"
    if thing == ANYONE:
        return True
    if thing in (PREDICTIONS, MODELS):
        return public or _signed_in(user)
    if thing == PEOPLE or isinstance(thing, TrainingRun):
        return _signed_in(user)
    if isinstance(thing, Prediction):
        return public or _signed_in(user) or thing.id in session.get(OWN_PREDICTIONS_KEY, [])
    if isinstance(thing, BatchJob):
        return _signed_in(user) and (thing.created_by == user.name or has_role(user, "admin"))
    raise TypeError(f"no read rule for {thing!r}")


def may_read(thing: object) -> bool:
    """``can_read`` for this request's reader (templates use it to leave out what the reader may not see)."""
    return can_read(reader(), thing)


def remember_own_prediction(prediction_id: int) -> None:
    """An anonymous visitor may come back to what it just submitted under ``READ_ACCESS=signed-in`` (kept in its
    session cookie; where reads are public, or for a signed-in user, there is nothing to keep)."""
    if current_user.is_authenticated or current_app.config["READ_ACCESS"] == "public":
        return
    own = [i for i in session.get(OWN_PREDICTIONS_KEY, []) if i != prediction_id]
    session[OWN_PREDICTIONS_KEY] = [*own, prediction_id][-OWN_PREDICTIONS_KEPT:]


def deny_read(user: Any, what: str) -> None:
    """Refuse: anonymous readers are asked to sign in (pages) or for a token (API); others get a 404."""
    if _signed_in(user):
        abort(404, description=f"there is no {what} you may read")
    if request.path.startswith("/api/"):
        abort(401, description=f"reading {what} needs an API token: Authorization: Bearer <token>")
    abort(login_manager.unauthorized())


def guard_reads() -> None:
    """Before every GET: the endpoint's kind, then each object named in the URL. An endpoint not in the table is
    refused to anonymous readers, so a new route is private until it is listed."""
    if request.method not in ("GET", "HEAD") or request.endpoint is None:
        return
    user = reader()
    kind = ENDPOINT_READS.get(request.endpoint, PEOPLE)
    if kind != ROLE_CHECKED and not can_read(user, kind):
        deny_read(user, kind)
    for arg, (model, name) in OBJECT_ARGS.items():
        value = (request.view_args or {}).get(arg)
        row = db.session.get(model, value) if value is not None else None
        if row is not None and not can_read(user, row):
            deny_read(user, f"{name} {value}")


def init_app(app: Flask) -> None:
    """Guard every read (``READ_ACCESS`` is checked with the other settings: webapp/config.py), and let templates
    ask ``may_read``."""
    app.before_request(guard_reads)
    app.jinja_env.globals.update(may_read=may_read, PEOPLE=PEOPLE, PREDICTIONS=PREDICTIONS, MODELS=MODELS)
