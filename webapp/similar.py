"""Similar past abstracts: the nearest stored predictions by cosine similarity of the model's pooled embedding.

Only results of the same model version are compared: each version (even of one taxonomy) has its own embedding
space, so distances across versions mean nothing. Each worker keeps, per version, the stored embeddings in one
normalised float32 matrix that grows by the rows stored since the last query (found by id, so a query reads only
new rows after the first one). The database keeps each vector once per prediction and encoder as int8
(``embeddings``, ``webapp/serving/stored.py``). Cost: 4 bytes x hidden size per stored result (1.5 KB for MiniLM,
150 MB per 100,000 predictions of one version) in every worker, and one matrix-vector product plus a sort per query.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from flask import Blueprint, Response, abort, current_app, jsonify, request
from sqlalchemy import select

from .curation.annotations import current_labels, mapped_result, review_status
from .explain import prediction_or_404, results_in
from .extensions import db
from .models import AnnotationEvent, Embedding, Prediction, PredictionResult
from .serving.stored import unpack_embedding

bp = Blueprint("similar", __name__)
EXTENSION_KEY = "papertag.similar"
# Rows fetched per query while loading a version's embeddings.
CHUNK = 500
# Ids this far below the highest loaded one are looked at again: a concurrent writer may commit a lower id later.
LATE_IDS = 1000
# Versions whose matrices a worker keeps (the least recently used is dropped).
VERSIONS_KEPT = 4
_cache_lock = threading.Lock()


def _normalised(blob: bytes) -> np.ndarray:
    vector = unpack_embedding(blob)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


@dataclass
class VersionIndex:
    """One version's stored embeddings: row i is result ``result_ids[i]`` of prediction ``prediction_ids[i]``."""

    version_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    result_ids: list[int] = field(default_factory=list)
    prediction_ids: list[int] = field(default_factory=list)
    text_sha256: list[str] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    known: set[int] = field(default_factory=set)
    newest: int = 0

    def refresh(self) -> None:
        """Append the rows stored since the last call (and any late commit among the last ``LATE_IDS`` ids)."""
        ids = db.session.scalars(
            select(PredictionResult.id).where(
                PredictionResult.model_version_id == self.version_id,
                PredictionResult.id > self.newest - LATE_IDS,
                PredictionResult.embedding_id.is_not(None),
            )
        )
        todo = sorted(set(ids) - self.known)
        for start in range(0, len(todo), CHUNK):
            rows = db.session.execute(
                select(
                    PredictionResult.id,
                    PredictionResult.prediction_id,
                    Prediction.text_sha256,
                    Embedding.vector,
                )
                .join(Prediction, Prediction.id == PredictionResult.prediction_id)
                .join(Embedding, Embedding.id == PredictionResult.embedding_id)
                .where(PredictionResult.id.in_(todo[start : start + CHUNK]))
            ).all()
            vectors = [_normalised(row.vector) for row in rows]
            width = self.matrix.shape[1] if len(self.result_ids) else (len(vectors[0]) if vectors else 0)
            kept = [(row, v) for row, v in zip(rows, vectors, strict=True) if len(v) == width]
            if not kept:
                continue
            self.matrix = np.vstack([self.matrix.reshape(-1, width), np.stack([v for _, v in kept])])
            for row, _ in kept:
                self.result_ids.append(row.id)
                self.prediction_ids.append(row.prediction_id)
                self.text_sha256.append(row.text_sha256)
                self.known.add(row.id)
                self.newest = max(self.newest, row.id)

    def nearest(self, result: PredictionResult, k: int) -> list[tuple[int, int, float]]:
        """``(result id, prediction id, cosine)`` of the ``k`` nearest other texts, most similar first; the
        prediction itself and copies of its text are left out, and copies among them count once."""
        with self.lock:
            self.refresh()
            if result.embedding is None or not self.result_ids:
                return []
            query = _normalised(result.embedding.vector)
            if len(query) != self.matrix.shape[1]:
                return []
            similarity = self.matrix @ query
            seen = {result.prediction.text_sha256}
            found = []
            for i in np.argsort(-similarity, kind="stable"):
                sha = self.text_sha256[i]
                if self.prediction_ids[i] == result.prediction_id or sha in seen:
                    continue
                seen.add(sha)
                found.append((self.result_ids[i], self.prediction_ids[i], float(similarity[i])))
                if len(found) == k:
                    break
            return found


def _index(version_id: str) -> VersionIndex:
    """This worker's index of a version (one cache per app, so several apps in one process stay apart)."""
    cache: OrderedDict[str, VersionIndex] = current_app.extensions.setdefault(EXTENSION_KEY, OrderedDict())
    with _cache_lock:
        index = cache.get(version_id)
        if index is None:
            index = cache[version_id] = VersionIndex(version_id)
        cache.move_to_end(version_id)
        while len(cache) > VERSIONS_KEPT:
            cache.popitem(last=False)
        return index


@dataclass(frozen=True)
class SimilarPaper:
    prediction: Prediction
    similarity: float
    labels: list[str]  # current: corrections applied
    model: list[str]  # what the model said, in today's names
    review: str | None  # "accepted", "corrected" or None

    @property
    def reviewed(self) -> bool:
        return self.review is not None

    @property
    def snippet(self) -> str:
        text = self.prediction.abstract
        return text if len(text) <= 240 else text[:240].rsplit(" ", 1)[0] + "…"


def similar_papers(result: PredictionResult, k: int) -> list[SimilarPaper]:
    """The nearest past abstracts of the same model version with their current labels in this taxonomy: the
    reviewed labels (corrections applied) when a curator reviewed them, else the predicted ones."""
    nearest = _index(result.model_version_id).nearest(result, k)
    if not nearest:
        return []
    results = {
        r.id: r
        for r in db.session.scalars(select(PredictionResult).where(PredictionResult.id.in_([n[0] for n in nearest])))
    }
    events: dict[int, list[AnnotationEvent]] = {}
    for event in db.session.scalars(
        select(AnnotationEvent).where(
            AnnotationEvent.prediction_id.in_([n[1] for n in nearest]),
            AnnotationEvent.taxonomy_id == result.taxonomy_id,
        )
    ):
        events.setdefault(event.prediction_id, []).append(event)
    papers = []
    for result_id, prediction_id, similarity in nearest:
        theirs = events.get(prediction_id, [])
        other = results[result_id]
        labels = current_labels(other, theirs)  # without events: the predicted labels, in today's names
        papers.append(
            SimilarPaper(other.prediction, similarity, labels, mapped_result(other).labels, review_status(theirs))
        )
    return papers


def _k() -> int:
    raw = request.args.get("k", str(current_app.config["SIMILAR_K"])).strip()
    high = current_app.config["SIMILAR_MAX_K"]
    if not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= high:
        abort(400, description=f"k must be a whole number from 1 to {high}, not {raw[:20]!r}")
    return int(raw)


def paper_json(paper: SimilarPaper) -> dict[str, object]:
    return {
        "id": paper.prediction.id,
        "title": paper.prediction.title or "",
        "snippet": paper.snippet,
        "similarity": round(paper.similarity, 6),
        "labels": paper.labels,
        "predicted": sorted(paper.model),
        "reviewed": paper.reviewed,
        "review": paper.review,
    }


@bp.get("/api/v1/predictions/<int:prediction_id>/similar")
def similar(prediction_id: int) -> Response:
    k = _k()
    prediction = prediction_or_404(prediction_id)
    out = {
        result.taxonomy.slug: {
            "model_version": result.model_version_id,
            "similar": [paper_json(p) for p in similar_papers(result, k)],
        }
        for result in results_in(prediction, request.args.get("taxonomy", "").strip())
    }
    return jsonify(prediction_id=prediction.id, results=out)
