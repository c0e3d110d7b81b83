"""Replay time: how long a replay of a candidate takes (why it is a background job), beside what is left in the
request that queues it.

In a temporary DATA_DIR (SQLite) it imports a bundle as the active version and its twin (the same model with
thresholds nudged, as bench/swap_time.py makes it) as the candidate, stores --papers abstracts from the shipped
Papers-with-Code set as predictions, marks --reviewed of them as corrected (to their data-set labels), and then,
in a fresh app (a worker whose model cache has never seen these texts), times the replay twice: the first loads
the candidate from the database into the model cache, the second finds it there. Each replay is queued as the page
does (timed: the request's share) and run to the end by this process as a job worker would. Prints seconds,
abstracts/s and the request's share.

The twin carries the same encoder.onnx, as a head retrained on the frozen encoder does: both versions then share
one encoder and its cache of readings, so the abstracts are encoded once (when --papers fits the encoder's cache of
256 texts) and each head runs on them. With --new-encoder the twin's encoder bytes differ (same graph and cost, as
after fine-tuning), so each version encodes every abstract.

    python bench/replay_time.py [--bundle models/research-tasks] [--papers 200] [--reviewed 50] [--new-encoder]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from flask import Flask  # noqa: E402
from sqlalchemy import select  # noqa: E402

from bench.swap_time import twin  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER  # noqa: E402
from webapp.jobs.engine import claim  # noqa: E402
from webapp.jobs.replay import REPLAY_JOBS, process_replay, queue_replay  # noqa: E402
from webapp.models import AnnotationEvent, ReplayReport, User  # noqa: E402
from webapp.serving import inference  # noqa: E402
from webapp.serving.registry import EXTENSION_KEY as LIVE_MODELS  # noqa: E402
from webapp.serving.registry import import_bundle, live_models  # noqa: E402
from webapp.serving.scoring import check_submission, predict_and_store  # noqa: E402

PAPERS = REPO / "data" / "pwc-tasks" / "papers.jsonl.gz"


def papers(count: int) -> list[dict]:
    with gzip.open(PAPERS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(count), handle, strict=False)]


def setup(
    config: dict, bundle: Path, twin_dir: Path, n_papers: int, reviewed: int, new_encoder: bool
) -> tuple[str, int]:
    """Import the bundle (active) and its twin (the candidate), store and review the papers; the candidate's id and
    the label count. The app and its models are gone when this returns."""
    app = create_app(config)
    rows = papers(n_papers)
    with app.app_context():
        flask_migrate.upgrade()
        active = import_bundle(bundle, actor="bench").version
        candidate = import_bundle(twin(bundle, twin_dir, new_encoder=new_encoder), actor="bench").version.id
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            predictions = predict_and_store([check_submission(r["title"], r["abstract"]) for r in chunk], "api")
            if start < reviewed:
                user = db.session.scalar(select(User)) or User(name="bench", role="curator")
                for prediction, row in list(zip(predictions, chunk, strict=True))[: reviewed - start]:
                    stored = set(prediction.results[0].labels)
                    gold = set(row["labels"]) & set(active.labels)
                    db.session.add(
                        AnnotationEvent(
                            prediction=prediction,
                            taxonomy_id=active.taxonomy_id,
                            user=user,
                            added=sorted(gold - stored),
                            removed=sorted(stored - gold),
                        )
                    )
                db.session.commit()
        labels = len(active.labels)
    stop(app)
    return candidate, labels


def stop(app: Flask) -> None:
    app.extensions[LIVE_MODELS].stop()
    app.extensions[BATCH_WORKER].stop()
    with app.app_context():
        db.engine.dispose()


def replay_once(config: dict, candidate: str) -> dict[str, float]:
    """One replay in a fresh app (a worker with the active model loaded): seconds, abstracts, reviewed and changed
    ones, and the onnxruntime threads."""
    worker = create_app(config)
    with worker.app_context():
        live = live_models()
        live.ensure_started()  # the active model loaded, as a running worker has it
        started = time.perf_counter()
        job_id = queue_replay(candidate, actor="bench").id  # what the request does
        queued = time.perf_counter() - started
        if claim(REPLAY_JOBS, "bench") != job_id:
            raise SystemExit(f"replay {job_id} could not be claimed")
        process_replay(job_id, "bench")  # what a job worker does
        seconds = time.perf_counter() - started
        report = db.session.get(ReplayReport, job_id)
        if report.status != "finished":
            raise SystemExit(f"replay {job_id} {report.status}: {report.error}")
        figures = {
            "seconds": seconds,
            "queue_seconds": queued,
            "abstracts": report.sample_size,
            "reviewed": report.report["sample"]["reviewed"],
            "changed": report.report["changed"],
            "threads": live.threads,
        }
    stop(worker)
    return figures


def no_encoder_left() -> None:
    """The models of the apps before are gone, and with them every encoder's cache of readings: the next replay
    encodes the texts afresh (encoders are shared per process while any loaded model holds them)."""
    gc.collect()
    if inference._encoders:
        raise SystemExit(f"{len(inference._encoders)} encoder(s) still loaded: the replay would read cached texts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "research-tasks")
    parser.add_argument("--papers", type=int, default=200)
    parser.add_argument("--reviewed", type=int, default=50)
    parser.add_argument(
        "--new-encoder", action="store_true", help="the candidate carries other encoder bytes (as after fine-tuning)"
    )
    args = parser.parse_args()
    passes = "an encoder each" if args.new_encoder else "one shared encoder"
    with tempfile.TemporaryDirectory(prefix="papertag-replay-bench-") as tmp:
        config = {"DATA_DIR": tmp, "DATABASE_URL": "", "SECRET_KEY": "bench", "REPLAY_SAMPLE_SIZE": args.papers}
        candidate, labels = setup(config, args.bundle, Path(tmp) / "twin", args.papers, args.reviewed, args.new_encoder)
        # Each replay in a fresh app on the same DATA_DIR: a worker whose in-memory caches never saw these texts;
        # only the on-disk model cache carries over, which the candidate's first replay fills.
        for attempt in ("first (candidate unpacked and loaded)", "second (candidate from the model cache)"):
            no_encoder_left()
            run = replay_once(config, candidate)
            print(
                f"{attempt}: {run['seconds']:.2f} s for {run['abstracts']} abstracts x 2 models ({passes}) "
                f"({run['abstracts'] / run['seconds']:.1f} abstracts/s); {run['reviewed']} reviewed, "
                f"{run['changed']} changed; the request that queues it: {run['queue_seconds'] * 1000:.0f} ms "
                f"({run['seconds'] / run['queue_seconds']:.0f}x less than the replay)"
            )
        print(
            f"bundle {args.bundle} ({labels} labels), {run['threads']} onnxruntime thread(s), {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
