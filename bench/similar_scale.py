"""Similar papers at scale (issue 13 point 3: p95 <= 150 ms and <= 300 MB RSS per web worker at 1M predictions):
p50/p95 of ``GET /api/v1/predictions/<id>/similar`` (k = 5, every taxonomy: what a prediction page asks) and the
serving process's RSS with a history of N predictions, through the vector index (``webapp/evidence/similar_index.py``),
against the exact in-memory search it replaced (every stored vector of a version in one normalised float32 matrix
per worker, a matrix-vector product and a sort per query) on the same database, same queries, same run.

Fill: the shipped taxonomies (``models/research-tasks``, ``models/arxiv-categories``) answer ``--scored`` real
abstracts for real (``bench/storage.py``'s ``model_answers``); prediction i takes answer ``i % scored`` with its
embedding plus Gaussian noise (``--noise`` x the embedding's own spread, so no two vectors are equal and neighbours
are not copies), one of ``--texts`` real abstracts as its text, a result per taxonomy (scores packed as the app
stores them) and one int8 embedding per prediction and encoder, written in chunks through SQLAlchemy Core and indexed
with ``similar_index.add_stored`` (what a Core writer calls). Predicted-label rows are left out: similar papers do
not read them.

Each measurement runs in a fresh process (spawn), so its RSS is that of one worker that served only these queries;
the baseline's matrices are built in one pass before its first query (the old code grew them 500 rows at a time).
``recall@5`` is the share of the exact 5 nearest (the baseline's answer) that the index returns, ``cosine ratio``
the mean cosine of the neighbours it returns over that of the exact ones.

    python bench/similar_scale.py [--sizes 100000,1000000] [--queries 200] [--database-url postgresql://...]

``measure_similar(app_or_url, n_queries)`` is meant for reuse (``bench/scale.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from flask import Flask  # noqa: E402
from sqlalchemy import func, insert, select, text  # noqa: E402

from bench.storage import (  # noqa: E402
    FILL_START,
    add_versions,
    bench_app,
    drop_postgres,
    fresh_postgres,
    model_answers,
    read_papers,
    shipped_bundles,
)
from webapp.evidence import similar, similar_index  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import Embedding, Prediction, PredictionResult, version_layout  # noqa: E402
from webapp.serving.stored import EMBEDDING_DTYPE, pack_embedding, rounded  # noqa: E402

CHUNK = 2000


def fill(app: Flask, n: int, scored: int, texts: int, noise: float, seed: int = 0) -> float:
    """``n`` predictions as the module docstring says; returns the seconds it took."""
    bundles = shipped_bundles()
    papers = read_papers(max(scored, texts))
    answers = model_answers(bundles, papers[:scored])
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with app.app_context(), db.engine.connect() as connection:
        taxonomy_ids = add_versions(connection, bundles)
        connection.commit()
        indexed = 0
        for start in range(0, n, CHUNK):
            chunk = range(start, min(n, start + CHUNK))
            rows = []
            for i in chunk:
                paper = papers[i % texts]
                rows.append(
                    {
                        "title": paper.get("title") or None,
                        "abstract": paper["abstract"],
                        "text_sha256": hashlib.sha256(f"{i} {paper['abstract']}".encode()).hexdigest(),
                        "source": "batch",
                        "created_at": FILL_START,
                    }
                )
            ids = connection.scalars(insert(Prediction).returning(Prediction.id, sort_by_parameter_order=True), rows)
            prediction_ids = ids.all()
            vectors: list[dict] = []
            results = []
            for i, prediction_id in zip(chunk, prediction_ids, strict=True):
                answer_set = answers[i % scored]
                shared: dict[bytes, int] = {}
                draw = rng.standard_normal(len(next(iter(answer_set.values())).embedding))
                for bundle in bundles:
                    answer = answer_set[bundle.slug]
                    embedding = answer.embedding + noise * float(np.std(answer.embedding)) * draw
                    vector = pack_embedding(embedding)
                    if vector not in shared:
                        shared[vector] = len(vectors)
                        vectors.append({"vector": vector})
                    scores = dict(zip(bundle.labels, rounded(answer.probabilities).tolist(), strict=True))
                    thresholds = dict(zip(bundle.labels, rounded(bundle.thresholds).tolist(), strict=True))
                    results.append(
                        {
                            "prediction_id": prediction_id,
                            "taxonomy_id": taxonomy_ids[bundle.slug],
                            "model_version_id": bundle.version_id,
                            "labels": answer.labels,
                            "margin": float(np.min(np.abs(answer.probabilities - bundle.thresholds))),
                            "embedding_id": shared[vector],  # an index into vectors until they are inserted
                            "best_guess": answer.best_guess,
                            "domain": round(answer.domain, 6),
                            "off_domain": answer.off_domain,
                            "read_tokens": answer.read_tokens,
                            "total_tokens": answer.total_tokens,
                            **version_layout(bundle.version_id).pack(scores, thresholds)._asdict(),
                        }
                    )
            embedding_ids = connection.scalars(
                insert(Embedding).returning(Embedding.id, sort_by_parameter_order=True), vectors
            ).all()
            for row in results:
                row["embedding_id"] = embedding_ids[row["embedding_id"]]
            connection.execute(insert(PredictionResult), results)
            indexed = similar_index.add_stored(connection, after=indexed)
            connection.commit()
            if (start // CHUNK) % 50 == 49:
                print(f"  filled {chunk.stop:,} in {time.perf_counter() - started:.0f} s", flush=True)
        if connection.dialect.name == "postgresql":
            connection.execute(text("ANALYZE"))
            connection.commit()
    return time.perf_counter() - started


def _rss_mb() -> tuple[float, float]:
    """This process's resident and peak resident memory, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _percentiles(times: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def _ids(app: Flask, n_queries: int, seed: int = 1) -> list[int]:
    with app.app_context():
        top = db.session.scalar(select(func.max(Prediction.id))) or 0
    return random.Random(seed).sample(range(1, top + 1), min(n_queries, top))


def measure_similar(app_or_url: Flask | str, n_queries: int, ids: Sequence[int] | None = None) -> dict:
    """p50/p95 of ``GET /api/v1/predictions/<id>/similar`` over ``n_queries`` predictions (``ids``, else random ones
    of the app's database; a URL needs ``ids`` and a token-free read access), after 3 warm-up calls; with an app, the
    RSS of this process after them. ``found`` holds each query's neighbours (taxonomy -> ids) for recall."""
    if isinstance(app_or_url, str):
        if ids is None:
            raise ValueError("measure_similar against a URL needs the prediction ids to ask about")

        def get(prediction_id: int) -> dict:
            with urllib.request.urlopen(f"{app_or_url}/api/v1/predictions/{prediction_id}/similar") as response:
                return json.loads(response.read())
    else:
        client = app_or_url.test_client()
        ids = list(ids) if ids is not None else _ids(app_or_url, n_queries)

        def get(prediction_id: int) -> dict:
            response = client.get(f"/api/v1/predictions/{prediction_id}/similar")
            assert response.status_code == 200, response.get_data(as_text=True)[:500]
            return response.get_json()

    ids = list(ids)[:n_queries]
    for prediction_id in ids[:3]:
        get(prediction_id)
    times, found = [], {}
    for prediction_id in ids:
        started = time.perf_counter()
        body = get(prediction_id)
        times.append(time.perf_counter() - started)
        found[prediction_id] = {
            slug: [(p["id"], p["similarity"]) for p in r["similar"]] for slug, r in body["results"].items()
        }
    out = {"queries": len(ids), **_percentiles(times), "found": found}
    if not isinstance(app_or_url, str):
        out["rss_mb"], out["peak_rss_mb"] = (round(x) for x in _rss_mb())
        with app_or_url.app_context():
            out["engine"] = similar_index.engine_for(db.session.connection()).name
    return out


class OldExactIndex:
    """The search this replaced (webapp/evidence/similar.py before issue 13 point 3), per version: every stored vector's
    direction in one float32 matrix, a matrix-vector product and a stable sort per query, built in one pass."""

    def __init__(self) -> None:
        self.versions: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]] = {}

    def load(self, version_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        if version_id not in self.versions:
            rows = db.session.execute(
                select(PredictionResult.id, PredictionResult.prediction_id, Prediction.text_sha256, Embedding.vector)
                .join(Prediction, Prediction.id == PredictionResult.prediction_id)
                .join(Embedding, Embedding.id == PredictionResult.embedding_id)
                .where(PredictionResult.model_version_id == version_id)
                .order_by(PredictionResult.id)
                .execution_options(yield_per=10000)
            )
            result_ids, prediction_ids, shas, blocks = [], [], [], []
            for row in rows:
                result_ids.append(row[0])
                prediction_ids.append(row[1])
                shas.append(row[2])
                blocks.append(row[3])
            matrix = np.frombuffer(b"".join(blocks), dtype=EMBEDDING_DTYPE).reshape(len(blocks), -1)
            del blocks
            matrix = matrix.astype(np.float32)
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            self.versions[version_id] = (np.asarray(result_ids), np.asarray(prediction_ids), matrix, shas)
        return self.versions[version_id]

    def nearest(self, result: PredictionResult, k: int) -> list[tuple[int, int, float]]:
        result_ids, prediction_ids, matrix, shas = self.load(result.model_version_id)
        query = np.frombuffer(result.embedding.vector, dtype=EMBEDDING_DTYPE).astype(np.float32)
        query /= np.linalg.norm(query)
        similarity = matrix @ query
        seen, found = {result.prediction.text_sha256}, []
        for i in np.argsort(-similarity, kind="stable"):
            if prediction_ids[i] == result.prediction_id or shas[i] in seen:
                continue
            seen.add(shas[i])
            found.append((int(result_ids[i]), int(prediction_ids[i]), float(similarity[i])))
            if len(found) == k:
                break
        return found


def _serve(data_dir: str, database_url: str, ids: list[int], baseline: bool, queue: multiprocessing.Queue) -> None:
    """One worker's view (a spawned process): the queries through the index, or through the old exact search."""
    app = bench_app(Path(data_dir), database_url)
    if baseline:
        old = OldExactIndex()
        similar.nearest = old.nearest  # the endpoint and page code stay; only the search differs
        started = time.perf_counter()
        with app.app_context():
            for version_id in db.session.scalars(select(PredictionResult.model_version_id).distinct()):
                old.load(version_id)
        load_s = time.perf_counter() - started
    out = measure_similar(app, len(ids), ids)
    if baseline:
        out["engine"], out["load_s"] = "old exact in-memory", round(load_s, 1)
    queue.put(out)


def run_in_process(data_dir: Path, database_url: str, ids: list[int], baseline: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_serve, args=(str(data_dir), database_url, ids, baseline, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def quality(found: dict, exact: dict) -> dict[str, float]:
    """``recall_at_5``: the share of the exact neighbours found, over every query and taxonomy; ``cosine_ratio``: the
    found neighbours' mean cosine over the exact ones' (1.0 when every neighbour found is as similar as the one it
    replaced: in a crowd of near-equal neighbours, missing the exact ones costs little)."""
    hits = total = 0
    ratios = []
    for prediction_id, by_slug in exact.items():
        for slug, expected in by_slug.items():
            got = found[prediction_id][slug]
            hits += len({i for i, _ in expected} & {i for i, _ in got})
            total += len(expected)
            if expected:
                ratios.append(np.mean([c for _, c in got]) / np.mean([c for _, c in expected]))
    return {
        "recall_at_5": round(hits / total, 4) if total else 1.0,
        "cosine_ratio": round(float(np.mean(ratios)), 4) if ratios else 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--scored", type=int, default=1000, help="abstracts the shipped models answer for real")
    parser.add_argument("--texts", type=int, default=2000, help="distinct real abstracts the texts recycle")
    parser.add_argument("--noise", type=float, default=0.5, help="noise added to a recycled embedding, x its spread")
    parser.add_argument("--database-url", default="", help="a PostgreSQL server (default: SQLite)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    report = []
    for n in (int(size) for size in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="papertag-bench-similar-") as tmp:
            url, admin = fresh_postgres(args.database_url) if args.database_url else ("", "")
            try:
                app = bench_app(Path(tmp), url)
                with app.app_context():
                    flask_migrate.upgrade()
                print(f"N = {n:,}; load average {os.getloadavg()[0]:.2f}", flush=True)
                seconds = fill(app, n, args.scored, args.texts, args.noise)
                ids = _ids(app, args.queries)
                with app.app_context():
                    db.engine.dispose()
                print(f"  filled in {seconds:.0f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
                index = run_in_process(Path(tmp), url, ids, baseline=False)
                line = {"n": n, "fill_s": round(seconds), "index": index}
                print(
                    f"  {index['engine']}: p50 {index['p50_ms']} ms, p95 {index['p95_ms']} ms, "
                    f"RSS {index['rss_mb']} MB (peak {index['peak_rss_mb']}); load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                if not args.skip_baseline:
                    old = run_in_process(Path(tmp), url, ids, baseline=True)
                    line["baseline"] = old
                    line |= quality(index["found"], old["found"])
                    print(
                        f"  old exact in-memory: p50 {old['p50_ms']} ms, p95 {old['p95_ms']} ms, RSS {old['rss_mb']} "
                        f"MB (built in {old['load_s']} s); index/old p95 {index['p95_ms'] / old['p95_ms']:.2f}x, "
                        f"RSS {index['rss_mb'] / old['rss_mb']:.2f}x; recall@5 {line['recall_at_5']}, "
                        f"cosine of the neighbours found / exact {line['cosine_ratio']}; "
                        f"load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
                report.append(line)
            finally:
                if url:
                    drop_postgres(url, admin)
    if args.json:
        for line in report:
            for part in ("index", "baseline"):
                line.get(part, {}).pop("found", None)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
