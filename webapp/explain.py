"""Explanations by occlusion: which sentences drove each label of a stored prediction.

Each sentence (the title is one unit) is removed in turn; a sentence's *drop* for a label is the label's score on
the full text minus its score without that sentence, so a positive drop means the sentence argued for the label.
The full text and every variant are scored in one uncached batched call of the live model of the prediction's
taxonomy (variants would only evict real abstracts from the model's LRU cache). When that model is not the
version that made the prediction, the answer says so (``same_version``) rather than loading the old version:
a second session per worker costs its memory and a load of about a second, and the scores shown beside the
explanation are always the explaining model's own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, abort, current_app, jsonify, request
from sqlalchemy import select

from .annotations import label_map
from .api import predict_rate_limit
from .extensions import db, limiter
from .models import Prediction, PredictionResult, Taxonomy
from .serving.bundle import compose_text
from .serving.inference import LoadedModel, sigmoid
from .serving.registry import LiveModel, live_models
from .serving.scoring import result_view
from .surgery import LabelMap

bp = Blueprint("explain", __name__)

# A full stop after these is not the end of a sentence (compared lower-case, leading brackets dropped).
ABBREVIATIONS = frozenset(
    "e.g. i.e. et al. al. cf. vs. fig. figs. eq. eqs. sec. ref. refs. no. approx. resp. viz. ca. incl.".split()
)
# A terminator (with any closing quotes or brackets) followed by space, or a blank line.
_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n[ \t]*\n")
# Inline LaTeX left in abstracts: no sentence ends inside $...$ or \(...\).
_MATH = re.compile(r"\$[^$]+\$|\\\(.+?\\\)")
_INITIALS = re.compile(r"(?:[A-Z]\.){2,}")
# What a sentence may start with besides an upper-case letter or a digit.
_OPENERS = "([\"'$\\"
# Heat levels shown on the page (static/js/explain.js uses the same constants).
LEVELS = 4
# Drops below half a point are shown as no effect; the scale never shrinks below 5 points, so a label on which
# no sentence matters much is not painted as if one did.
NEGLIGIBLE_DROP = 0.005
MIN_SCALE = 0.05


class Unexplainable(RuntimeError):
    """This result cannot be explained right now (its taxonomy has no live model): a 409."""


def _is_boundary(text: str, match: re.Match[str], math_spans: list[tuple[int, int]]) -> bool:
    if match.group().startswith("\n"):
        return True
    if any(start < match.start() < end for start, end in math_spans):
        return False
    word = text[: match.start() + 1].rsplit(None, 1)[-1].lstrip("([\"'")
    if word.lower() in ABBREVIATIONS or _INITIALS.fullmatch(word):
        return False
    following = text[match.end() :].lstrip()[:1]
    return not following or following.isupper() or following.isdigit() or following in _OPENERS


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    piece = text[start:end]
    if not piece.strip():
        return None
    return start + len(piece) - len(piece.lstrip()), end - (len(piece) - len(piece.rstrip()))


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans ``(start, end)`` of ``text`` (end exclusive, surrounding space left out).

    A regex splitter tuned for abstracts: it knows "e.g.", "et al." and friends, decimals, initials such as
    "U.S.", and LaTeX math; a sentence must start with a capital, a digit, a bracket, a quote or LaTeX.
    """
    math_spans = [m.span() for m in _MATH.finditer(text)]
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _END.finditer(text):
        if not _is_boundary(text, match, math_spans):
            continue
        span = _trimmed(text, start, match.end())
        if span:
            spans.append(span)
        start = match.end()
    span = _trimmed(text, start, len(text))
    if span:
        spans.append(span)
    return spans


@dataclass(frozen=True)
class Unit:
    """One removable piece of what the model read: the title, or a sentence of the abstract."""

    field: str  # "title" or "abstract"
    start: int
    end: int


def units_of(prediction: Prediction) -> list[Unit]:
    """The title as one unit (whatever punctuation it has), then the abstract's sentences."""
    title = [Unit("title", 0, len(prediction.title))] if prediction.title else []
    return title + [Unit("abstract", *span) for span in split_sentences(prediction.abstract)]


def variant_texts(prediction: Prediction, units: list[Unit]) -> list[str]:
    """The text the model read with each unit removed, composed as the model saw the original."""
    texts = []
    for unit in units:
        if unit.field == "title":
            texts.append(compose_text(None, prediction.abstract))
            continue
        abstract = prediction.abstract
        rest = f"{abstract[: unit.start].rstrip()} {abstract[unit.end :].lstrip()}"
        texts.append(compose_text(prediction.title, rest))
    return texts


def _read_ids(model: LoadedModel, texts: list[str]) -> list[tuple[tuple[int, ...], ...]]:
    """What the encoder reads of each text: its windows' token ids (text past the last window is not read)."""
    return [tuple(tuple(window) for window in model.encoder.windows(text)[0]) for text in texts]


def occlusion(
    model: LoadedModel, full: str, variants: list[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-text probabilities, each variant's drop (full - variant) per label, and which variants the model
    reads differently from the full text, from one batched, uncached pass.

    A variant whose windows equal the full text's (its sentence lies past the last window, so the encoder never
    read it) is not run when the head has no lexical part reading the whole text: its drop is exactly zero and it
    is marked unread.
    """
    if model.reads_text:
        read = np.ones(len(variants), dtype=bool)
    else:
        ids = _read_ids(model, [full, *variants])
        read = np.array([tokens != ids[0] for tokens in ids[1:]], dtype=bool)
    changed = [variants[i] for i in np.flatnonzero(read)]
    probabilities = sigmoid(model.logits([full, *changed], batch_size=batch_size))
    drops = np.zeros((len(variants), len(model.labels)), dtype=np.float64)
    drops[read] = probabilities[0] - probabilities[1:]
    return probabilities[0], drops, read


def live_model_for(result: PredictionResult) -> LiveModel:
    live = live_models().current().get(result.taxonomy.slug)
    if live is None:
        raise Unexplainable(f"taxonomy {result.taxonomy.slug!r} has no model serving now, so nothing can explain it")
    return live


def output_index(model: LoadedModel, probabilities: np.ndarray, labels_map: LabelMap) -> Callable[[str], int | None]:
    """Today's label name -> the model output that reads as it: itself, or after label surgery the stored name it
    came from (of a merge, the source that clears its threshold by the most, as the result page shows it)."""
    index = {label: i for i, label in enumerate(model.labels)}

    def find(label: str) -> int | None:
        if label in index:
            return index[label]
        sources = [index[name] for name in labels_map.sources(label)[0] if name in index]
        return max(sources, key=lambda j: probabilities[j] - model.thresholds[j], default=None)

    return find


def explain_result(prediction: Prediction, result: PredictionResult) -> dict[str, Any]:
    """One taxonomy's explanation: the stored result's predicted labels and its near misses, each with its
    score by the explaining model and every unit's drop; units past the model's max length are ``read: false``."""
    live = live_model_for(result)
    model = live.model
    units = units_of(prediction)
    full = compose_text(prediction.title, prediction.abstract)
    variants = variant_texts(prediction, units)
    config = current_app.config
    probabilities, drops, read = occlusion(model, full, variants, config["EXPLAIN_BATCH_SIZE"])
    view = result_view(result, config["NEAR_MISSES"])
    output = output_index(model, probabilities, label_map(result.taxonomy_id))
    predicted = {row.label for row in view.predicted}
    labels = []
    for row in view.predicted + view.near_misses:
        j = output(row.label)
        if j is None:  # the serving version has no such label
            continue
        labels.append(
            {
                "label": row.label,
                "predicted": row.label in predicted,
                "score": round(float(probabilities[j]), 6),
                "threshold": round(float(model.thresholds[j]), 6),
                "sentences": [
                    {
                        "field": unit.field,
                        "start": unit.start,
                        "end": unit.end,
                        "drop": round(float(drops[i, j]), 6),
                        "read": bool(read[i]),
                    }
                    for i, unit in enumerate(units)
                ],
            }
        )
    answer: dict[str, Any] = {
        "model_version": live.version_id,
        "prediction_model_version": result.model_version_id,
        "same_version": live.version_id == result.model_version_id,
        "labels": labels,
    }
    if not answer["same_version"]:
        answer["note"] = (
            f"explained by {live.version_id}, the version serving now; the prediction was made by "
            f"{result.model_version_id}, so scores may differ from the stored ones"
        )
    return answer


def prediction_or_404(prediction_id: int) -> Prediction:
    prediction = db.session.get(Prediction, prediction_id)
    if prediction is None:
        abort(404, description=f"there is no prediction {prediction_id}")
    return prediction


def results_in(prediction: Prediction, slug: str) -> list[PredictionResult]:
    """The prediction's results, or only the one of taxonomy ``slug`` (404 when it has none there)."""
    if not slug:
        return list(prediction.results)
    found = [r for r in prediction.results if r.taxonomy.slug == slug]
    if not found:
        known = db.session.scalar(select(Taxonomy.id).where(Taxonomy.slug == slug))
        reason = "has no result in taxonomy" if known else "cannot be in an unknown taxonomy"
        abort(404, description=f"prediction {prediction.id} {reason} {slug[:63]!r}")
    return found


@bp.get("/api/v1/predictions/<int:prediction_id>/explanation")
@limiter.limit(predict_rate_limit)
def explanation(prediction_id: int) -> Response:
    prediction = prediction_or_404(prediction_id)
    explanations, errors = {}, {}
    for result in results_in(prediction, request.args.get("taxonomy", "").strip()):
        try:
            explanations[result.taxonomy.slug] = explain_result(prediction, result)
        except Unexplainable as exc:
            errors[result.taxonomy.slug] = str(exc)
    if not explanations:
        abort(409, description="; ".join(errors.values()) or f"prediction {prediction_id} has no result to explain")
    return jsonify(prediction_id=prediction.id, explanations=explanations, errors=errors)


def heat_class(drop: float, scale: float) -> str:
    """CSS class of a sentence by its drop, relative to the label's largest (``static/js/explain.js`` twin)."""
    if abs(drop) < NEGLIGIBLE_DROP:
        return "heat-0"
    level = min(LEVELS, math.ceil(LEVELS * abs(drop) / max(scale, MIN_SCALE)))
    return f"heat-{'pos' if drop > 0 else 'neg'}-{level}"


@dataclass(frozen=True)
class Highlight:
    """One unit as the page shows it: its text, heat class and drop in points ("" when negligible)."""

    field: str
    text: str
    css: str = ""
    drop: str = ""


@dataclass(frozen=True)
class PagePanel:
    """The units of the prediction page's explanation; ``highlights`` are the ones explained server-side for
    taxonomy ``slug`` (``?explain=<slug>&label=...``, for browsers without JavaScript)."""

    units: tuple[Highlight, ...]
    slug: str = ""
    label: str = ""
    status: int = 200
    message: str = ""
    highlights: tuple[Highlight, ...] = ()


def page_panel(prediction: Prediction, slug: str, label: str) -> PagePanel:
    """The prediction page's sentences, and when ``slug`` is given the explanation of ``label`` (default: the
    first label offered) in that taxonomy; a bad slug or label gives a message and a 4xx status."""
    source = {"title": prediction.title or "", "abstract": prediction.abstract}
    units = tuple(Highlight(u.field, source[u.field][u.start : u.end]) for u in units_of(prediction))
    if not slug:
        return PagePanel(units)
    result = next((r for r in prediction.results if r.taxonomy.slug == slug), None)
    if result is None:
        return PagePanel(units, slug, label, 404, f"this prediction has no result in taxonomy {slug!r}")
    try:
        answer = explain_result(prediction, result)
    except Unexplainable as exc:
        return PagePanel(units, slug, label, 409, str(exc))
    entries = {entry["label"]: entry for entry in answer["labels"]}
    if not entries:
        return PagePanel(units, slug, label, 409, "the model serving now knows none of this prediction's labels")
    notes, status = [answer.get("note", "")], 200
    if label not in entries:
        if label:
            notes, status = [f"{label[:300]!r} is not one of the labels explained here"], 400
        label = next(iter(entries))
    entry = entries[label]
    scale = max(abs(s["drop"]) for s in entry["sentences"])
    highlights = []
    for unit, s in zip(units, entry["sentences"], strict=True):
        css = heat_class(s["drop"], scale) if s["read"] else "unread"
        drop = f"{s['drop'] * 100:+.1f}" if css.startswith(("heat-pos", "heat-neg")) else ""
        highlights.append(Highlight(unit.field, unit.text, css, drop))
    notes.append(f"{label}: {entry['score'] * 100:.1f}% (threshold {entry['threshold'] * 100:.1f}%)")
    return PagePanel(units, slug, label, status, "; ".join(filter(None, notes)), tuple(highlights))
