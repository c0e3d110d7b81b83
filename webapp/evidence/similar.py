"""Similar past abstracts: the nearest stored predictions by cosine similarity of the model's pooled embedding.

Only results of the same model version are compared (the index searches the embeddings of the version's encoder,
``webapp/evidence/similar_index.py``, and keeps the version's results). What is compared: the stored int8 directions
(``embeddings.vector``, ``webapp/serving/stored.py``), by exact cosine. Which results are looked at comes from the
vector index (``webapp/evidence/similar_index.py``: sqlite-vec on SQLite, pgvector's HNSW on PostgreSQL, else an exact
scan): it proposes ``CANDIDATES_PER_K`` times ``k`` candidates (at least ``MIN_CANDIDATES``), this module ranks them
exactly and leaves out the prediction itself and copies of texts already listed; when that leaves fewer than ``k``
and the index had more, it asks for four times as many, and past ``MAX_CANDIDATES`` (a version whose results are
sparse in an embedding space shared with newer versions) it scans the version's own vectors. A space with at most
that many embeddings is searched exactly. Nothing is kept between requests, so a web worker's memory does not grow
with the history.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, Response, abort, current_app, jsonify, request
from sqlalchemy import select

from ..curation.annotations import current_labels, mapped_result, review_status
from ..extensions import db
from ..models import AnnotationEvent, Embedding, Prediction, PredictionResult
from ..request_input import whole_number
from . import similar_index
from .explain import prediction_or_404, results_in

bp = Blueprint("similar", __name__)
# Candidates asked of the index per neighbour wanted: binary codes and HNSW are approximate, the ranking is exact.
# bench/similar_scale.py measures how many of the exact k nearest this finds.
CANDIDATES_PER_K = 8
MIN_CANDIDATES = 64


def _ranked(result: PredictionResult, candidate_ids: list[int], k: int) -> list[tuple[int, int, float]]:
    """The ``k`` nearest of the candidates by exact cosine, most similar first (ties by result id); the prediction
    itself and copies of its text are left out, and copies among them count once."""
    rows = db.session.execute(
        select(PredictionResult.id, PredictionResult.prediction_id, Prediction.text_sha256, Embedding.vector)
        .join(Prediction, Prediction.id == PredictionResult.prediction_id)
        .join(Embedding, Embedding.id == PredictionResult.embedding_id)
        .where(PredictionResult.id.in_(candidate_ids), PredictionResult.model_version_id == result.model_version_id)
    ).all()
    query = result.embedding.vector
    rows = [row for row in rows if len(row.vector) == len(query)]
    similarity = similar_index.cosines([row.vector for row in rows], query).tolist() if rows else []
    scored = sorted(zip(similarity, rows, strict=True), key=lambda pair: (-pair[0], pair[1].id))
    seen = {result.prediction.text_sha256}
    found = []
    for similarity, row in scored:
        if row.prediction_id == result.prediction_id or row.text_sha256 in seen:
            continue
        seen.add(row.text_sha256)
        found.append((row.id, row.prediction_id, similarity))
        if len(found) == k:
            break
    return found


def nearest(result: PredictionResult, k: int) -> list[tuple[int, int, float]]:
    """``(result id, prediction id, cosine)`` of the ``k`` nearest other texts of ``result``'s model version."""
    if result.embedding is None:
        return []
    connection = db.session.connection()
    engine = similar_index.engine_for(connection)
    wanted = max(MIN_CANDIDATES, CANDIDATES_PER_K * k)
    while True:
        candidates = engine.candidates(connection, result.model_version_id, result.embedding.vector, wanted)
        found = _ranked(result, candidates.result_ids, k)
        if len(found) == k or not candidates.more:
            return found
        if wanted >= similar_index.MAX_CANDIDATES:
            break
        wanted = min(4 * wanted, similar_index.MAX_CANDIDATES)
    # The space's nearest embeddings are mostly other versions' (an old version among newer ones): scan this one's.
    scan = similar_index.ExactScan().candidates(connection, result.model_version_id, result.embedding.vector, wanted)
    return _ranked(result, scan.result_ids, k)


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
    nearest_ones = nearest(result, k)
    if not nearest_ones:
        return []
    wanted = [n[0] for n in nearest_ones]
    results = {r.id: r for r in db.session.scalars(select(PredictionResult).where(PredictionResult.id.in_(wanted)))}
    events: dict[int, list[AnnotationEvent]] = {}
    for event in db.session.scalars(
        select(AnnotationEvent).where(
            AnnotationEvent.prediction_id.in_([n[1] for n in nearest_ones]),
            AnnotationEvent.taxonomy_id == result.taxonomy_id,
        )
    ):
        events.setdefault(event.prediction_id, []).append(event)
    papers = []
    for result_id, prediction_id, similarity in nearest_ones:
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
    k = whole_number(raw, high)
    if not k:
        abort(400, description=f"k must be a whole number from 1 to {high}, not {raw[:20]!r}")
    return k


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
