"""Checking submissions, running every active model over them and storing the predictions.

Shared by the web form, the JSON API and (issue 4) CSV batches, so the rules are written once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import current_app

from ..curation.annotations import mapped_result
from ..extensions import db
from ..models import Embedding, Prediction, PredictionResult
from .bundle import compose_text
from .inference import score_all
from .registry import LiveModel, live_models
from .stored import pack_embedding, rounded

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A submission that cannot be predicted; the message tells the person what to change."""


class NoModelError(RuntimeError):
    """No taxonomy has an active, loaded model in this worker."""


class ScoringError(NoModelError):
    """Every chosen taxonomy's model failed on this request (raised, or answered non-finite scores): nothing to
    store, so callers answer it like no model at all (a 503; a batch job stops with the reason)."""


class Stored(list[Prediction]):
    """The stored predictions, with ``errors``: {taxonomy slug: why its model gave no answer} for the taxonomies
    that failed on this request (their results are missing; every other taxonomy's are stored)."""

    def __init__(self, predictions: Iterable[Prediction], errors: dict[str, str]) -> None:
        super().__init__(predictions)
        self.errors = errors


@dataclass(frozen=True)
class Submission:
    title: str | None
    abstract: str

    @property
    def text(self) -> str:
        return compose_text(self.title, self.abstract)


def _check_text(value: str, field: str) -> None:
    if "\x00" in value:
        raise InputError(f"{field} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{field} is not valid Unicode text") from exc


def _one_newline(text: str) -> str:
    """Line breaks as ``\n``: a browser sends a textarea's as CRLF (HTML's form encoding) while its length counter
    counts them as one character, and the same text must be the same text whichever way it came (limits, hash)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_submission(title: Any, abstract: Any) -> Submission:
    """Validate one title/abstract pair against the configured limits; raises :class:`InputError`."""
    config = current_app.config
    low, high, title_max = config["ABSTRACT_MIN_CHARS"], config["ABSTRACT_MAX_CHARS"], config["TITLE_MAX_CHARS"]
    if abstract is None:
        raise InputError("abstract is required")
    if not isinstance(abstract, str):
        raise InputError(f"abstract must be a string, not {type(abstract).__name__}")
    if title is not None and not isinstance(title, str):
        raise InputError(f"title must be a string, not {type(title).__name__}")
    abstract = _one_newline(abstract).strip()
    title = _one_newline(title or "").strip() or None
    if not abstract:
        raise InputError("abstract is empty")
    _check_text(abstract, "abstract")
    if len(abstract) < low:
        raise InputError(f"abstract is {len(abstract)} characters long; it must have at least {low}")
    if len(abstract) > high:
        raise InputError(f"abstract is {len(abstract)} characters long; it must have at most {high}")
    if title is not None:
        _check_text(title, "title")
        if len(title) > title_max:
            raise InputError(f"title is {len(title)} characters long; it must have at most {title_max}")
    return Submission(title, abstract)


def chosen_models(slugs: Any = None) -> dict[str, LiveModel]:
    """The live models a submission is scored with: every active taxonomy, or those ``slugs`` name (a list of
    taxonomy slugs, from the API's optional ``taxonomies``). Raises :class:`InputError` or :class:`NoModelError`."""
    live = live_models().current()
    if not live:
        raise NoModelError("no model is active yet: import one with `flask --app wsgi models import PATH`")
    if slugs is None:
        return dict(live)
    if not isinstance(slugs, list) or not slugs or not all(isinstance(s, str) for s in slugs):
        raise InputError("taxonomies must be a non-empty list of taxonomy slugs")
    unknown = sorted(set(slugs) - set(live))
    if unknown:
        raise InputError(f"no active model for taxonomies {unknown}; active: {sorted(live)}")
    return {slug: live[slug] for slug in slugs}


def predict_and_store(
    submissions: list[Submission],
    source: str,
    batch_id: int | None = None,
    *,
    commit: bool = True,
    models: dict[str, LiveModel] | None = None,
) -> Stored:
    """Score with each chosen taxonomy's model (all active ones by default; one encoder pass for all of them) and
    store one Prediction per submission, in one commit. A taxonomy whose model fails is reported in the result's
    ``errors`` and the others are stored; :class:`ScoringError` when every one failed.

    ``commit=False`` only flushes, so a caller (a batch job) can commit its own bookkeeping atomically with them.
    """
    live = models if models is not None else chosen_models()
    texts = [s.text for s in submissions]
    # Every taxonomy's model is the one grabbed above, even if the watcher swaps meanwhile.
    errors: dict[str, str] = {}
    scored = score_all({slug: entry.model for slug, entry in sorted(live.items())}, texts, errors=errors)
    for slug, reason in errors.items():
        log.error("model %s of taxonomy %s failed on %d texts: %s", live[slug].version_id, slug, len(texts), reason)
    if not scored:
        raise ScoringError("no model could answer: " + "; ".join(f"{slug}: {why}" for slug, why in errors.items()))
    predictions = []
    for i, submission in enumerate(submissions):
        prediction = Prediction(
            title=submission.title,
            abstract=submission.abstract,
            text_sha256=hashlib.sha256(texts[i].encode("utf-8")).hexdigest(),
            source=source,
            batch_id=batch_id,
        )
        # Taxonomies whose bundles share the encoder read the same vector: one stored copy for all of them.
        embeddings: dict[bytes, Embedding] = {}
        for slug, outputs in scored.items():
            entry = live[slug]
            labels, thresholds = entry.model.labels, entry.model.thresholds
            answer = outputs[i]
            probabilities = answer.probabilities
            decision = entry.model.decide(probabilities, answer.domain)
            vector = pack_embedding(answer.embedding)
            result = PredictionResult(
                taxonomy_id=entry.taxonomy_id,
                model_version_id=entry.version_id,
                scores=dict(zip(labels, rounded(probabilities).tolist(), strict=True)),
                labels=decision.labels,
                thresholds=dict(zip(labels, rounded(thresholds).tolist(), strict=True)),
                margin=float(np.min(np.abs(probabilities - thresholds))),
                embedding=embeddings.setdefault(vector, Embedding(vector=vector)),
                best_guess=decision.best_guess,
                domain=round(answer.domain, 6),
                off_domain=decision.off_domain,
                read_tokens=answer.read_tokens,
                total_tokens=answer.total_tokens,
                lexical_whole_text=entry.model.reads_text,
            )
            result.add_label_rows(prediction)
            prediction.results.append(result)
        predictions.append(prediction)
    db.session.add_all(predictions)
    if commit:
        db.session.commit()
    else:
        db.session.flush()
    return Stored(predictions, errors)


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    threshold: float


@dataclass(frozen=True)
class ResultView:
    """One taxonomy's answer as pages show it: predicted labels, the near misses, the version. ``read_tokens`` are
    the word pieces the encoder read; ``lexical_whole_text``: the head's lexical part read the whole text (None:
    not recorded)."""

    slug: str
    name: str
    version_id: str
    predicted: list[LabelScore]
    near_misses: list[LabelScore]
    best_guess: bool
    off_domain: bool
    read_tokens: int | None
    total_tokens: int | None
    lexical_whole_text: bool | None

    @property
    def truncated(self) -> bool:
        """Whether part of the text was not read by the encoder."""
        return self.read_tokens is not None and self.total_tokens is not None and self.read_tokens < self.total_tokens


def just_missed(rows: list[LabelScore], chosen: set[str], most: int, share: float) -> list[LabelScore]:
    """The ``most`` most probable labels not chosen whose score reaches ``share`` of their own threshold (``rows``
    sorted by score): a label far below its threshold was never close, and listing it as a near miss misleads."""
    return [row for row in rows if row.label not in chosen and row.score >= share * row.threshold][:most]


def result_view(result: PredictionResult, near_misses: int) -> ResultView:
    """In today's label names (label surgery); a merged label shows its best source's score. At most
    ``near_misses`` near misses, above the app's ``NEAR_MISS_SHARE`` of their thresholds."""
    mapped = mapped_result(result)
    ranked = sorted(mapped.scores.items(), key=lambda item: -item[1])
    chosen = set(mapped.labels)
    rows = [LabelScore(label, score, mapped.thresholds.get(label, 0.5)) for label, score in ranked]
    return ResultView(
        slug=result.taxonomy.slug,
        name=result.taxonomy.name,
        version_id=result.model_version_id,
        predicted=[row for row in rows if row.label in chosen],
        near_misses=just_missed(rows, chosen, near_misses, current_app.config["NEAR_MISS_SHARE"]),
        best_guess=result.best_guess,
        off_domain=result.off_domain,
        read_tokens=result.read_tokens,
        total_tokens=result.total_tokens,
        lexical_whole_text=result.lexical_whole_text,
    )


def prediction_json(prediction: Prediction, slugs: dict[int, str]) -> dict[str, Any]:
    """The API shape of one prediction (PRODUCT contract), in today's label names. ``slugs``: taxonomy id -> slug of
    the models that answered (known to the caller, so no result loads its taxonomy row)."""
    results = {}
    for result in prediction.results:
        mapped = mapped_result(result)
        results[slugs[result.taxonomy_id]] = {
            "model_version": result.model_version_id,
            "labels": mapped.labels,
            "scores": mapped.scores,
            "below_threshold": result.best_guess,
            "off_domain": result.off_domain,
            "tokens_read": result.read_tokens,
            "tokens_total": result.total_tokens,
            "lexical_whole_text": result.lexical_whole_text,
        }
    return {"id": prediction.id, "results": results}
