"""Replay time: how long a replay of a candidate takes, i.e. whether it fits in a web request.

In a temporary DATA_DIR (SQLite) it imports a bundle as the active version and its twin (the same model with
thresholds nudged, as bench/swap_time.py makes it) as the candidate, stores --papers abstracts from the shipped
Papers-with-Code set as predictions, marks --reviewed of them as corrected (to their data-set labels), and then,
in a fresh app (a worker whose model cache has never seen these texts), times the replay twice: the first loads
the candidate from the database into the model cache, the second finds it there. Prints seconds and abstracts/s.

    python bench/replay_time.py [--bundle models/research-tasks] [--papers 200] [--reviewed 50]
"""

from __future__ import annotations

import argparse
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
from sqlalchemy import select  # noqa: E402

from bench.swap_time import twin  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import AnnotationEvent, User  # noqa: E402
from webapp.registry import EXTENSION_KEY as LIVE_MODELS  # noqa: E402
from webapp.registry import import_bundle, live_models  # noqa: E402
from webapp.replay import run_replay  # noqa: E402
from webapp.scoring import check_submission, predict_and_store  # noqa: E402

PAPERS = REPO / "data" / "pwc-tasks" / "papers.jsonl.gz"


def papers(count: int) -> list[dict]:
    with gzip.open(PAPERS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(count), handle, strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "research-tasks")
    parser.add_argument("--papers", type=int, default=200)
    parser.add_argument("--reviewed", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="papertag-replay-bench-") as tmp:
        config = {"DATA_DIR": tmp, "DATABASE_URL": "", "SECRET_KEY": "bench", "REPLAY_SAMPLE_SIZE": args.papers}
        app = create_app(config)
        rows = papers(args.papers)
        with app.app_context():
            flask_migrate.upgrade()
            active = import_bundle(args.bundle, actor="bench").version
            candidate = import_bundle(twin(args.bundle, Path(tmp) / "twin"), actor="bench").version.id
            for start in range(0, len(rows), 64):
                chunk = rows[start : start + 64]
                predictions = predict_and_store([check_submission(r["title"], r["abstract"]) for r in chunk], "api")
                if start < args.reviewed:
                    user = db.session.scalar(select(User)) or User(name="bench", role="curator")
                    for prediction, row in list(zip(predictions, chunk, strict=True))[: args.reviewed - start]:
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
        app.extensions[LIVE_MODELS].stop()
        # Each replay in a fresh app on the same DATA_DIR: a worker whose in-memory caches never saw these texts;
        # only the on-disk model cache carries over, which the candidate's first replay fills.
        for attempt in ("first (candidate unpacked and loaded)", "second (candidate from the model cache)"):
            worker = create_app(config)
            with worker.app_context():
                live = live_models()
                live.ensure_started()  # the active model loaded, as a running worker has it
                started = time.perf_counter()
                report = run_replay(candidate, actor="bench")
                seconds = time.perf_counter() - started
                print(
                    f"{attempt}: {seconds:.2f} s for {report.sample_size} abstracts x 2 models "
                    f"({report.sample_size / seconds:.1f} abstracts/s); {report.report['sample']['reviewed']} "
                    f"reviewed, {report.report['changed']} changed"
                )
                live.stop()
        print(
            f"bundle {args.bundle} ({labels} labels), {live.threads} onnxruntime thread(s), {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
