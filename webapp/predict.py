"""The home page: paste an abstract, get each active taxonomy's labels."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import StringField, TextAreaField
from wtforms.validators import ValidationError

from .access.read_access import remember_own_prediction
from .api import predict_rate_limit
from .extensions import limiter
from .serving.registry import live_models
from .serving.scoring import InputError, NoModelError, check_submission, predict_and_store

bp = Blueprint("predict", __name__)


class PredictForm(FlaskForm):
    title = StringField("Title (optional)")
    abstract = TextAreaField("Abstract")

    def validate_abstract(self, field: TextAreaField) -> None:
        """The same rules as the API, so the messages match."""
        try:
            check_submission(self.title.data, field.data)
        except InputError as exc:
            if str(exc).startswith("title"):
                self.title.errors = [*self.title.errors, str(exc)]
            else:
                raise ValidationError(str(exc)) from exc


def _render(form: PredictForm, status: int = 200, error: str | None = None) -> tuple[str, int]:
    config = current_app.config
    live = live_models().current()
    return (
        render_template(
            "predict/index.html",
            form=form,
            live=sorted(live.values(), key=lambda entry: entry.slug),
            error=error,
            min_chars=config["ABSTRACT_MIN_CHARS"],
            max_chars=config["ABSTRACT_MAX_CHARS"],
            title_max=config["TITLE_MAX_CHARS"],
        ),
        status,
    )


@bp.get("/")
def index() -> tuple[str, int]:
    return _render(PredictForm())


@bp.post("/")
@limiter.limit(predict_rate_limit)
def submit() -> Response | tuple[str, int]:
    form = PredictForm()
    if not form.validate() or form.title.errors:
        return _render(form, 400)
    submission = check_submission(form.title.data, form.abstract.data)
    try:
        stored = predict_and_store([submission], source="web")
    except NoModelError as exc:
        return _render(form, 503, error=str(exc))
    prediction = stored[0]
    for slug, reason in stored.errors.items():
        flash(f"The {slug} model could not answer this abstract ({reason}); the other taxonomies did.", "error")
    remember_own_prediction(prediction.id)  # its result page stays readable under READ_ACCESS=signed-in
    return redirect(url_for("history.detail", prediction_id=prediction.id, new=1))
