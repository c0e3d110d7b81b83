"""Explanations by occlusion: which sentences drove each label of a stored prediction.

Each sentence (the title is one unit) is removed in turn; a sentence's *drop* for a label is the label's score on
the full text minus its score without that sentence, so a positive drop means the sentence argued for the label.

The work is bounded whatever the abstract's length (a 20,000-character one once took 11.5 CPU-seconds and froze the
site): past ``EXPLAIN_MAX_UNITS`` units the trailing sentences are grouped into a few spans, the full text is
tokenised once to find which units the encoder's windows read, only those variants go through the encoder (each
cut a sentence after the last token it can read), and a head with a lexical part reads every variant whole with the
full text's encoder reading where the encoder would read the same. So one explanation is at most
``1 + EXPLAIN_MAX_UNITS`` texts through the encoder and the head, in uncached batches (variants would only evict
real abstracts from the model's LRU cache). Each explanation is stored per (result, model version) and read back.

When the live model is not the version that made the prediction, the answer says so (``same_version``) rather than
loading the old version: a second session per worker costs its memory and a load of about a second, and the scores
shown beside the explanation are always the explaining model's own.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_right
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, abort, current_app, jsonify, request
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from ..api import predict_rate_limit
from ..curation.annotations import label_map
from ..extensions import db, limiter
from ..models import Explanation, Prediction, PredictionResult, Taxonomy
from ..serving.bundle import compose_text
from ..serving.inference import LoadedModel, sigmoid
from ..serving.registry import LiveModel, live_models
from ..serving.scoring import result_view
from ..surgery import LabelMap

log = logging.getLogger(__name__)

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
    """One removable piece of what the model read: the title, or a sentence (or a span of trailing sentences) of
    the abstract."""

    field: str  # "title" or "abstract"
    start: int
    end: int


def units_of(prediction: Prediction, max_units: int) -> list[Unit]:
    """The title as one unit (whatever punctuation it has), then the abstract's sentences; past ``max_units`` the
    trailing sentences are grouped into ``max_units // 4`` spans of about equal counts, so the number of units (and
    of model runs) never grows with the abstract's length, and the first sentences, which the encoder's windows
    read, keep their own."""
    title = [Unit("title", 0, len(prediction.title))] if prediction.title else []
    units = title + [Unit("abstract", *span) for span in split_sentences(prediction.abstract)]
    if len(units) <= max_units:
        return units
    spans = max(1, max_units // 4)
    keep = max(len(title), max_units - spans)
    groups = np.array_split(np.arange(keep, len(units)), spans)
    return units[:keep] + [Unit("abstract", units[g[0]].start, units[g[-1]].end) for g in groups if len(g)]


def variant_text(prediction: Prediction, unit: Unit, upto: int | None = None) -> str:
    """The text the model reads with ``unit`` removed, composed as the model saw the original; ``upto`` cuts the
    abstract at that offset (a sentence end past what the encoder reads, so its windows are unchanged)."""
    abstract = prediction.abstract[:upto]
    if unit.field == "title":
        return compose_text(None, abstract)
    return compose_text(prediction.title, f"{abstract[: unit.start].rstrip()} {abstract[unit.end :].lstrip()}")


@dataclass(frozen=True)
class Occlusion:
    """The texts one explanation runs: the full text and each unit's variant whole (what a lexical head reads),
    and for the units the encoder reads, their variants (and the full text) cut a sentence past its last window."""

    full: str
    variants: list[str]
    encoder_full: str
    encoder_variants: dict[int, str]


def occlusion_texts(model: LoadedModel, prediction: Prediction, units: list[Unit]) -> Occlusion:
    """Tokenise the full text once and find, from the token offsets, which units lie inside the encoder's windows:
    a unit that starts after the last token read leaves the windows of its variant equal to the full text's."""
    full = compose_text(prediction.title, prediction.abstract)
    variants = [variant_text(prediction, unit) for unit in units]
    _, read, total = model.encoder.windows(full)
    if read == total:  # the encoder reads everything: every variant is read whole (and is short)
        return Occlusion(full, variants, full, dict(enumerate(variants)))
    ends = [end for _, end in model.encoder.tokenizer.encode(full, add_special_tokens=False).offsets]
    title = (prediction.title or "").strip()
    shift = (len(title) + 2 if title else 0) - (len(prediction.abstract) - len(prediction.abstract.lstrip()))

    def tokens_to(offset: int) -> int:
        """Tokens of the full text that end at or before ``offset``."""
        return bisect_right(ends, offset)

    def start(unit: Unit) -> int:
        """Where the unit's variant departs from the full text (the space before the unit left out)."""
        return 0 if unit.field == "title" else len(full[: unit.start + shift].rstrip())

    def end(unit: Unit) -> int:
        return len(title) if unit.field == "title" else unit.end + shift

    def cut(removed: int) -> int | None:
        """The end of the first abstract unit with more than ``read`` tokens before it once ``removed`` are gone (and
        the full stop a removed title takes with it)."""
        return next((u.end for u in units if u.field == "abstract" and tokens_to(end(u)) - removed > read + 1), None)

    encoder_variants = {}
    for i, unit in enumerate(units):
        before = tokens_to(start(unit))
        if before < read:
            encoder_variants[i] = variant_text(prediction, unit, cut(tokens_to(end(unit)) - before))
    return Occlusion(full, variants, compose_text(prediction.title, prediction.abstract[: cut(0)]), encoder_variants)


def occlusion(model: LoadedModel, texts: Occlusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-text probabilities, each variant's drop (full - variant) per label, and which variants the model reads
    differently from the full text, from uncached model runs (one per text, as every text is read) of at most
    ``1 + units`` texts.

    A variant the encoder reads as the full text is not run through the encoder: with a lexical part the head reads
    it whole beside the full text's reading; without one its drop is exactly zero and it is marked unread.
    """
    encoded = list(texts.encoder_variants)
    readings = model.encoder.run([texts.encoder_full, *texts.encoder_variants.values()])
    if model.reads_text:
        of_variant = [readings[0]] * len(texts.variants)
        for k, i in enumerate(encoded):
            of_variant[i] = readings[k + 1]
        logits, _ = model.head_outputs([texts.full, *texts.variants], [readings[0], *of_variant])
        read = np.ones(len(texts.variants), dtype=bool)
    else:
        logits, _ = model.head_outputs([texts.full, *(texts.variants[i] for i in encoded)], readings)
        read = np.zeros(len(texts.variants), dtype=bool)
        read[encoded] = True
    probabilities = sigmoid(logits)
    drops = np.zeros((len(texts.variants), len(model.labels)), dtype=np.float64)
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


def _rounded(values: np.ndarray) -> list[Any]:
    return np.round(values.astype(np.float64), 6).tolist()


def occlusion_payload(
    prediction: Prediction, result: PredictionResult, live: LiveModel, computing: AbstractContextManager
) -> dict[str, Any]:
    """The model's part of an explanation (units, which are read, probabilities and drops of every output), read
    from the ``explanations`` table, or computed inside ``computing`` (the page's rate limit) and stored. Every
    output is kept, so label renames and ``NEAR_MISSES`` apply when the answer is built, not when it was cached."""
    units = units_of(prediction, current_app.config["EXPLAIN_MAX_UNITS"])
    spans = [[unit.field, unit.start, unit.end] for unit in units]
    row = db.session.scalar(
        select(Explanation).where(Explanation.result_id == result.id, Explanation.model_version_id == live.version_id)
    )
    if row is not None and row.payload.get("units") == spans:
        return row.payload
    with computing:
        probabilities, drops, read = occlusion(live.model, occlusion_texts(live.model, prediction, units))
    payload = {
        "units": spans,
        "read": read.tolist(),
        "probabilities": _rounded(probabilities),
        "drops": _rounded(drops),
    }
    _store(row, result.id, live.version_id, payload)
    return payload


def _store(row: Explanation | None, result_id: int, version_id: str, payload: dict[str, Any]) -> None:
    """Keep the explanation; a concurrent request that stored it first, or a database busy writing, costs only the
    cache (the answer is served either way)."""
    if row is None:
        db.session.add(Explanation(result_id=result_id, model_version_id=version_id, payload=payload))
    else:  # computed with other unit settings (EXPLAIN_MAX_UNITS changed)
        row.payload = payload
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
    except OperationalError as exc:
        db.session.rollback()
        log.warning("explanation of result %s not cached: %s", result_id, exc.orig)


def explain_result(
    prediction: Prediction, result: PredictionResult, computing: AbstractContextManager | None = None
) -> dict[str, Any]:
    """One taxonomy's explanation: the stored result's predicted labels and its near misses, each with its
    score by the explaining model and every unit's drop; units past the model's max length are ``read: false``.
    ``computing`` wraps the model run when the explanation is not stored yet (the page's rate limit)."""
    live = live_model_for(result)
    model = live.model
    payload = occlusion_payload(prediction, result, live, computing or nullcontext())
    probabilities, drops = np.asarray(payload["probabilities"]), np.asarray(payload["drops"])
    view = result_view(result, current_app.config["NEAR_MISSES"])
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
                "score": float(probabilities[j]),
                "threshold": round(float(model.thresholds[j]), 6),
                "sentences": [
                    {"field": field, "start": start, "end": end, "drop": float(drops[i, j]), "read": read}
                    for i, ((field, start, end), read) in enumerate(zip(payload["units"], payload["read"], strict=True))
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
    first label offered) in that taxonomy; a bad slug or label gives a message and a 4xx status. Computing an
    explanation counts against the client's prediction rate limit, as the API's does (a stored one does not)."""
    source = {"title": prediction.title or "", "abstract": prediction.abstract}
    max_units = current_app.config["EXPLAIN_MAX_UNITS"]
    units = tuple(Highlight(u.field, source[u.field][u.start : u.end]) for u in units_of(prediction, max_units))
    if not slug:
        return PagePanel(units)
    result = next((r for r in prediction.results if r.taxonomy.slug == slug), None)
    if result is None:
        return PagePanel(units, slug, label, 404, f"this prediction has no result in taxonomy {slug!r}")
    try:
        answer = explain_result(prediction, result, limiter.limit(predict_rate_limit))
    except Unexplainable as exc:
        return PagePanel(units, slug, label, 409, str(exc))
    except RateLimitExceeded as exc:
        message = f"too many explanations computed for you (limit: {exc.description}); try again in a minute"
        return PagePanel(units, slug, label, 429, message)
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
