"""Label surgery: rename, merge and split a taxonomy's labels. Each change is an append-only LabelChange that
pages, the API, exports and the trainer read through (``webapp/surgery.py``); nothing stored is rewritten and
undo only marks a change undone. Admins work on ``/taxonomies/<slug>/labels``; the JSON API calls the same
functions."""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from werkzeug.wrappers import Response
from wtforms import SelectField, SelectMultipleField, StringField, TextAreaField

from .access.auth import role_required
from .curation.annotations import (
    corrected_predictions,
    forget_label_maps,
    label_map,
    label_rows,
    mapped_result,
    prediction_texts,
)
from .curation.corrections import (
    MAX_NOTE_CHARS,
    CorrectionError,
    check_label,
    check_note,
    stored_labels,
    taxonomy_labels,
)
from .extensions import db
from .history.search import same_label
from .models import (
    AnnotationEvent,
    LabelChange,
    LabelProposal,
    PredictionResult,
    Taxonomy,
    utcnow,
)
from .serving.bundle import compose_text
from .serving.registry import get_taxonomy
from .surgery import KINDS, Rule

bp = Blueprint("labels", __name__)

MAX_KEYWORDS = 50


class SurgeryError(ValueError):
    """A label change that cannot be made (or undone) as asked; the message says why."""


def _name(raw: object, what: str) -> str:
    try:
        return check_label(raw)
    except CorrectionError as exc:
        raise SurgeryError(f"{what}: {exc}") from exc


def _existing(raw: object, current: set[str], what: str) -> str:
    label = _name(raw, what)
    if label not in current:
        raise SurgeryError(f"{what}: {label!r} is not a label of this taxonomy")
    return label


def _fresh(name: str, allowed: set[str], current: set[str], retired: set[str]) -> None:
    """A new name must be new as the history's label filter reads names (case and separators aside), or the filter
    would lump two labels together: a current label means a merge, a retired one would read old items as new.
    ``allowed`` (the labels the change replaces) may be respelt."""
    existing = same_label(name, sorted(current - allowed))
    if existing is not None:
        raise SurgeryError(f"{_as(name, existing)} already exists; merge the labels instead")
    if same_label(name, allowed) is not None:
        return
    existing = same_label(name, sorted(retired))
    if existing is not None:
        raise SurgeryError(f"{_as(name, existing)} was a label before (changes retired it); choose another name")


def _as(name: str, existing: str) -> str:
    """``name`` quoted, and the label it reads as when spelt otherwise."""
    if name == existing:
        return repr(name)
    return f"{name!r} (read as {existing!r}: case, spaces, hyphens and underscores do not count)"


def check_change(taxonomy: Taxonomy, kind: object, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as stored, or SurgeryError. rename ``{"from", "to"}``, merge ``{"sources", "into"}``,
    split ``{"label", "targets": [{"name", "keywords"}]}`` (the first target without keywords is the default)."""
    current = set(taxonomy_labels(taxonomy))
    retired = stored_labels(taxonomy) | {name for rule in label_map(taxonomy.id).rules for name in rule.names}
    if kind == "rename":
        old = _existing(payload.get("from"), current, "rename")
        new = _name(payload.get("to"), "new name")
        if new == old:
            raise SurgeryError("the new name is the old one")
        _fresh(new, {old}, current, retired)
        return {"from": old, "to": new}
    if kind == "merge":
        raw = payload.get("sources")
        if not isinstance(raw, list):
            raise SurgeryError("sources must be a list of labels")
        sources = sorted({_existing(label, current, "merge") for label in raw})
        if len(sources) < 2:
            raise SurgeryError("a merge needs at least two different labels")
        into = _name(payload.get("into"), "merged name")
        _fresh(into, set(sources), current, retired)
        return {"sources": sources, "into": into}
    if kind == "split":
        label = _existing(payload.get("label"), current, "split")
        targets = _split_targets(payload.get("targets"))
        for target in targets:
            _fresh(target["name"], {label}, current, retired)
        return {"label": label, "targets": targets}
    raise SurgeryError(f"kind must be one of {', '.join(KINDS)}")


def _split_targets(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise SurgeryError("a split needs at least two targets")
    targets, seen = [], set()
    for item in raw:
        if not isinstance(item, dict):
            raise SurgeryError('each target is {"name": "...", "keywords": [...]}')
        name = _name(item.get("name"), "target")
        twin = same_label(name, seen)
        if twin is not None:
            raise SurgeryError(f"target {_as(name, twin)} is named twice")
        seen.add(name)
        keywords = item.get("keywords") or []
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise SurgeryError(f"the keywords of {name!r} must be a list of strings")
        keywords = sorted({" ".join(k.split()) for k in keywords} - {""})
        if any(unicodedata.category(ch).startswith("C") for k in keywords for ch in k):
            raise SurgeryError(f"the keywords of {name!r} contain a control character or a lone surrogate")
        if len(keywords) > MAX_KEYWORDS or any(len(k) > 100 for k in keywords):
            raise SurgeryError(f"{name!r}: at most {MAX_KEYWORDS} keywords of at most 100 characters")
        targets.append({"name": name, "keywords": keywords})
    defaults = [t["name"] for t in targets if not t["keywords"]]
    if not defaults:
        raise SurgeryError("a split needs a default target (one without keywords) for papers no keyword matches")
    if len(defaults) > 1:
        raise SurgeryError(
            f"only one target may have no keywords (the default); give {', '.join(defaults[1:])} keywords"
        )
    return targets


def preview(taxonomy: Taxonomy, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the change would touch: stored predictions and corrected items carrying a source label now, and for
    a split, how many of each would go to each target."""
    rule = Rule.from_payload(0, kind, payload)
    sources = set(rule.sources)
    labels_map = label_map(taxonomy.id)
    rows = label_rows(taxonomy.id, {n for s in sources for n in labels_map.sources(s)[0]})
    texts = prediction_texts(pid for _, pid, _ in rows)
    affected = {pid for _, pid, label in rows if labels_map.map_label(label, texts[pid]) & sources}
    corrected = {}
    for record in corrected_predictions(taxonomy.slug):
        if set(record["labels"]) & sources:
            corrected[record["id"]] = compose_text(record["title"], record["abstract"])
    targets = {t.name: {"predictions": 0, "corrections": 0} for t in rule.targets}
    for counts, texts_of in (("predictions", {pid: texts[pid] for pid in affected}), ("corrections", corrected)):
        for text in texts_of.values():
            for name in rule.route(text):
                targets[name][counts] += 1
    return {"predictions": len(affected), "corrections": len(corrected), "targets": targets}


def record_change(
    taxonomy: Taxonomy, kind: object, payload: dict[str, Any], actor: str, note: object = ""
) -> LabelChange:
    checked = check_change(taxonomy, kind, payload)
    try:
        note = check_note(note)
    except CorrectionError as exc:
        raise SurgeryError(str(exc)) from exc
    change = LabelChange(taxonomy_id=taxonomy.id, kind=kind, payload=checked, actor=actor, note=note)
    db.session.add(change)
    db.session.commit()
    forget_label_maps()
    return change


def undo_change(change: LabelChange, actor: str) -> None:
    """Mark the change undone. Refused while a later change builds on its labels (undo that one first) or when
    corrections since were recorded in the names it made (they would lose their meaning)."""
    if change.undone_at is not None:
        raise SurgeryError(f"change #{change.id} was already undone")
    rule = _rule(change)
    later = [r for r in label_map(change.taxonomy_id).rules if r.id > change.id and r.names & rule.names]
    if later:
        raise SurgeryError(
            f"undo change #{later[-1].id} first: it changes {', '.join(sorted(later[-1].names & rule.names))} too"
        )
    made = {t.name for t in rule.targets} - set(rule.sources)
    used = db.session.scalars(
        select(AnnotationEvent).where(
            AnnotationEvent.taxonomy_id == change.taxonomy_id, AnnotationEvent.created_at >= change.created_at
        )
    )
    uses = sum(1 for event in used if made & (set(event.added) | set(event.removed)))
    if uses:
        raise SurgeryError(
            f"{uses} correction(s) since change #{change.id} use the names it made ({', '.join(sorted(made))}); "
            "undoing it would strand them. Make a new change instead"
        )
    change.undone_at, change.undone_by = utcnow(), actor
    db.session.commit()
    forget_label_maps()


def _rule(change: LabelChange) -> Rule:
    return Rule.from_payload(change.id, change.kind, change.payload, change.created_at)


def changes(taxonomy: Taxonomy) -> list[LabelChange]:
    return list(
        db.session.scalars(select(LabelChange).where(LabelChange.taxonomy_id == taxonomy.id).order_by(LabelChange.id))
    )


def change_json(change: LabelChange) -> dict[str, Any]:
    return _rule(change).to_json() | {
        "payload": change.payload,
        "actor": change.actor,
        "note": change.note,
        "undone_at": change.undone_at.isoformat() + "Z" if change.undone_at else None,
        "undone_by": change.undone_by,
    }


def change_log_json(taxonomy: Taxonomy) -> dict[str, Any]:
    """``GET /api/v1/taxonomies/<slug>/label-changes``: the label set now, the log, and the compiled rules the
    trainer applies to its base papers (:meth:`LabelMap.from_json`)."""
    return {
        "taxonomy": taxonomy.slug,
        "labels": taxonomy_labels(taxonomy),
        "changes": [change_json(c) for c in changes(taxonomy)],
        "rules": label_map(taxonomy.id).to_json(),
    }


def label_counts(taxonomy: Taxonomy) -> dict[str, dict[str, int]]:
    """Current label -> how many stored predictions carry it and how many corrected items have it now."""
    labels_map = label_map(taxonomy.id)
    counts = {label: {"predictions": 0, "corrections": 0} for label in taxonomy_labels(taxonomy)}
    rows = label_rows(taxonomy.id)
    by_text = {label for label in {r[2] for r in rows} if len(labels_map.vocabulary([label])) > 1}
    texts = prediction_texts(pid for _, pid, label in rows if label in by_text)
    carried: dict[int, set[str]] = {}
    for rid, pid, label in rows:
        carried.setdefault(rid, set()).update(labels_map.map_label(label, texts.get(pid, "")))
    predictions = Counter(label for labels in carried.values() for label in labels)
    corrections = Counter(label for record in corrected_predictions(taxonomy.slug) for label in record["labels"])
    for label in counts:
        counts[label] = {"predictions": predictions[label], "corrections": corrections[label]}
    return counts


# ---- pages ----------------------------------------------------------------------------------------------------


class RenameForm(FlaskForm):
    label = SelectField("Label", choices=[], validate_choice=False)
    to = StringField("New name")
    note = StringField("Note")


class MergeForm(FlaskForm):
    sources = SelectMultipleField("Labels to merge", choices=[], validate_choice=False)
    into = StringField("Merged name (new, or one of them)")
    note = StringField("Note")


class SplitForm(FlaskForm):
    label = SelectField("Label", choices=[], validate_choice=False)
    targets = TextAreaField("Targets, one a line: name: keyword, keyword (the line without keywords is the default)")
    note = StringField("Note")


FORMS = {"rename": RenameForm, "merge": MergeForm, "split": SplitForm}


def parse_targets(text: str) -> list[dict[str, Any]]:
    """``Name: keyword, keyword`` lines (a line without ``:`` is a target without keywords)."""
    targets = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, _, keywords = line.partition(":")
        targets.append({"name": name, "keywords": [k for k in keywords.split(",") if k.strip()]})
    return targets


def _payload(kind: str, form: FlaskForm) -> dict[str, Any]:
    if kind == "rename":
        return {"from": form.label.data, "to": form.to.data}
    if kind == "merge":
        return {"sources": form.sources.data or [], "into": form.into.data}
    return {"label": form.label.data, "targets": parse_targets(form.targets.data)}


def _render(taxonomy: Taxonomy, status: int = 200, **active: Any) -> tuple[str, int]:
    """The page; ``active`` holds the submitted form (``kind``, ``form``) with its ``error`` or ``preview``."""
    labels = taxonomy_labels(taxonomy)
    forms = {}
    for kind, form_class in FORMS.items():
        form = active["form"] if active.get("kind") == kind else form_class(formdata=None)
        for field in ("label", "sources"):
            if field in form:
                form[field].choices = labels
        forms[kind] = form
    return (
        render_template(
            "labels/index.html",
            taxonomy=taxonomy,
            counts=label_counts(taxonomy),
            forms=forms,
            active=active,
            changes=list(reversed(changes(taxonomy))),
            max_note=MAX_NOTE_CHARS,
        ),
        status,
    )


@bp.get("/taxonomies/<slug>/labels")
@role_required("admin")
def index(slug: str) -> tuple[str, int]:
    return _render(get_taxonomy(slug))


@bp.post("/taxonomies/<slug>/labels/<kind>")
@role_required("admin")
def change(slug: str, kind: str) -> Response | tuple[str, int]:
    """Preview (``action=preview``) or apply a rename, merge or split."""
    taxonomy = get_taxonomy(slug)
    if kind not in FORMS:
        abort(404, description=f"there is no label change {kind!r}; there are {', '.join(KINDS)}")
    form = FORMS[kind]()  # CSRF was checked app-wide before this view
    payload = _payload(kind, form)
    try:
        if request.form.get("action") == "preview":
            checked = check_change(taxonomy, kind, payload)
            return _render(taxonomy, kind=kind, form=form, preview=preview(taxonomy, kind, checked))
        made = record_change(taxonomy, kind, payload, actor=current_user.name, note=form.note.data)
    except SurgeryError as exc:
        db.session.rollback()
        return _render(taxonomy, 400, kind=kind, form=form, error=str(exc))
    flash(f"Change #{made.id} applied: {describe(made)}. Every page, export and the next training run use it.", "ok")
    return redirect(url_for("labels.index", slug=slug))


def change_or_404(taxonomy: Taxonomy, change_id: int) -> LabelChange:
    made = db.session.get(LabelChange, change_id)
    if made is None or made.taxonomy_id != taxonomy.id:
        abort(404, description=f"{taxonomy.name} has no label change #{change_id}")
    return made


@bp.post("/taxonomies/<slug>/labels/changes/<int:change_id>/undo")
@role_required("admin")
def undo(slug: str, change_id: int) -> Response:
    made = change_or_404(get_taxonomy(slug), change_id)
    try:
        undo_change(made, actor=current_user.name)
    except SurgeryError as exc:
        db.session.rollback()
        flash(f"Not undone: {exc}.", "error")
        return redirect(url_for("labels.index", slug=slug))
    flash(f"Change #{made.id} undone ({describe(made)}); the labels read as before it.", "ok")
    return redirect(url_for("labels.index", slug=slug))


@bp.app_template_filter("describe_change")
def describe(change: LabelChange) -> str:
    payload = change.payload
    if change.kind == "rename":
        return f"{payload['from']} → {payload['to']}"
    if change.kind == "merge":
        return f"{' + '.join(payload['sources'])} → {payload['into']}"
    parts = [
        t["name"] + (f" ({', '.join(t['keywords'])})" if t["keywords"] else " (default)") for t in payload["targets"]
    ]
    return f"{payload['label']} → {' | '.join(parts)}"


@bp.app_template_filter("label_now")
def proposal_label_now(proposal: LabelProposal) -> list[str]:
    """An accepted proposal's label after the taxonomy's label changes (a split label: all its targets)."""
    return label_map(proposal.taxonomy_id).vocabulary([proposal.final_label or proposal.label])


@bp.app_template_filter("labels_now")
def labels_now(result: PredictionResult) -> list[str]:
    """A stored result's predicted labels in today's names, for list pages (history, review queue)."""
    return mapped_result(result).labels
