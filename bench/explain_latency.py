"""Explanation latency: one occlusion explanation of a typical abstract, next to one plain prediction of it.

Picks --papers abstracts of typical length (those nearest the median character length of the data set) and, for
each onnxruntime thread count in --threads, runs the app in-process on a temporary SQLite database with the
bundle imported and the papers predicted, then times per paper:

- **plain**: one prediction of the composed text (the encoder on its windows, then the head; the encoder's cache
  of readings bypassed);
- **occlusion**: the model's part of an explanation (split into sentences, compose the variants, tokenise,
  an encoder run per variant the model reads, one head run over the full text and every variant: all of them when
  the head has a TF-IDF part);
- **endpoint**: ``GET /api/v1/predictions/<id>/explanation`` through Flask (database, every taxonomy, JSON).

Prints p50/p95 of each (wall clock), the ratio of the p50s (occlusion / plain), the sentences per abstract, and
the median CPU time of plain and occlusion (process time: with one onnxruntime thread, what the wall time is on an
otherwise idle core; this is the figure to trust on a machine others are using).

With ``--chars N`` each abstract is followed by the next ones up to N characters (20,000 is the longest the API
takes: the input that once froze the site); the occlusion's work is bounded by ``EXPLAIN_MAX_UNITS``, not N.

    python bench/explain_latency.py [--bundle models/research-tasks] [--papers 20] [--repeats 3] [--threads 1 2]
                                    [--chars 20000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402

from bench.http_latency import cores  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.evidence.explain import occlusion, occlusion_texts, units_of  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER  # noqa: E402
from webapp.models import Prediction  # noqa: E402
from webapp.serving.bundle import compose_text  # noqa: E402
from webapp.serving.registry import import_bundle, live_models  # noqa: E402


def typical_papers(path: Path, n: int) -> list[dict]:
    """The ``n`` papers whose abstracts are nearest the median length (ties by id, so the choice is stable)."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    median = statistics.median(len(row["abstract"]) for row in rows)
    return sorted(rows, key=lambda row: (abs(len(row["abstract"]) - median), row["id"]))[:n]


def lengthened(papers: list[dict], chars: int) -> list[dict]:
    """Each paper with the following papers' abstracts appended up to ``chars`` characters (whole sentences)."""
    longer = []
    for i, paper in enumerate(papers):
        text = " ".join(p["abstract"].strip() for p in papers[i:] + papers[:i])
        while len(text) < chars:
            text = f"{text} {text}"
        longer.append({**paper, "abstract": text[:chars].rsplit(". ", 1)[0] + "."})
    return longer


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return 1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def timed(action, repeats: int, cpu: list[float] | None = None) -> list[float]:  # noqa: ANN001 - any callable
    """Wall seconds of each call; process CPU seconds appended to ``cpu`` when given."""
    times = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        action()
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return times


def run(bundle: Path, papers: list[dict], threads: int, repeats: int, data_dir: Path) -> dict[str, object]:
    app = create_app(
        {
            "DATA_DIR": str(data_dir),
            "SECRET_KEY": "bench",
            "DEFAULT_BUNDLES_DIR": str(data_dir / "none"),
            "ORT_THREADS": threads,
            "RATELIMIT_ENABLED": False,
        }
    )
    client = app.test_client()
    with app.app_context():
        flask_migrate.upgrade()
        import_bundle(bundle, actor="bench")
        max_units = app.config["EXPLAIN_MAX_UNITS"]
    body = {"abstracts": [{"title": p["title"], "abstract": p["abstract"]} for p in papers]}
    ids = [p["id"] for p in client.post("/api/v1/predict", json=body).get_json()["predictions"]]
    plain: list[float] = []
    occluded: list[float] = []
    endpoint: list[float] = []
    sentences: list[int] = []
    cpu: dict[str, list[float]] = {"plain": [], "occlusion": []}
    with app.app_context():
        model = next(iter(live_models().current().values())).model
        for prediction_id in ids:
            prediction = db.session.get(Prediction, prediction_id)
            full = compose_text(prediction.title, prediction.abstract)

            def explain_model_part(prediction: Prediction = prediction) -> None:
                units = units_of(prediction, max_units)
                occlusion(model, occlusion_texts(model, prediction, units))

            model.logits([full])  # warm up this length
            plain += timed(lambda full=full: model.logits([full]), repeats, cpu["plain"])
            occluded += timed(explain_model_part, repeats, cpu["occlusion"])
            sentences.append(len(units_of(prediction, max_units)))
            url = f"/api/v1/predictions/{prediction_id}/explanation"
            endpoint += timed(lambda url=url: client.get(url), repeats)
        live_models().stop()
        app.extensions[BATCH_WORKER].stop()
        db.engine.dispose()
    return {"plain": plain, "occlusion": occluded, "endpoint": endpoint, "sentences": sentences, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(REPO / "models" / "research-tasks"))
    parser.add_argument("--data", default=str(REPO / "data" / "pwc-tasks" / "papers.jsonl.gz"))
    parser.add_argument("--papers", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chars", type=int, default=0, help="lengthen each abstract to this many characters")
    args = parser.parse_args()
    papers = typical_papers(Path(args.data), args.papers)
    if args.chars:
        papers = lengthened(papers, args.chars)
    lengths = sorted(len(p["abstract"]) for p in papers)
    print(f"{len(papers)} abstracts of {lengths[0]}-{lengths[-1]} characters, {args.repeats} repeats each")
    print(f"cores: {cores()}, load average {os.getloadavg()[0]:.1f}, bundle {args.bundle}")
    for threads in args.threads:
        with tempfile.TemporaryDirectory(prefix="papertag-bench-") as tmp:
            figures = run(Path(args.bundle), papers, threads, args.repeats, Path(tmp))
        plain, occluded, endpoint = (percentiles(figures[k]) for k in ("plain", "occlusion", "endpoint"))
        units = figures["sentences"]
        print(
            f"ORT threads {threads}: plain p50 {plain[0]:.1f} ms p95 {plain[1]:.1f} | occlusion p50 {occluded[0]:.1f} "
            f"ms p95 {occluded[1]:.1f} | endpoint p50 {endpoint[0]:.1f} ms p95 {endpoint[1]:.1f} | ratio of p50s "
            f"{occluded[0] / plain[0]:.1f}x | units per abstract {min(units)}-{max(units)} "
            f"(median {statistics.median(units):.0f})"
        )
        cpu = {k: 1000 * statistics.median(v) for k, v in figures["cpu"].items()}
        print(f"    CPU time p50: plain {cpu['plain']:.1f} ms, occlusion {cpu['occlusion']:.1f} ms")


if __name__ == "__main__":
    main()
