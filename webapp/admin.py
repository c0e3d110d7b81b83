"""The models page: every version of every taxonomy, its metrics and the activation log (read-only)."""

from __future__ import annotations

from flask import Blueprint, render_template
from sqlalchemy import select

from .extensions import db
from .models import ActivationEvent, Taxonomy
from .registry import live_models

bp = Blueprint("admin", __name__)


@bp.get("/models")
def models() -> str:
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    events = db.session.scalars(select(ActivationEvent).order_by(ActivationEvent.id.desc()).limit(50)).all()
    slugs = {t.id: t.slug for t in taxonomies}
    return render_template(
        "admin/models.html",
        taxonomies=taxonomies,
        events=events,
        slugs=slugs,
        loaded=live_models().loaded(),
        errors=live_models().errors,
    )
