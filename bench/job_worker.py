"""A job worker process on a CSV batch: what the job engine costs beside the tagging itself, and the worker's memory.

On a temporary DATA_DIR with the shipped models (``models/*``), it starts ``flask --app wsgi jobs worker`` and runs
a 4-row batch through it (the worker loads its models on its first job). Then, --rounds times, alternately: the
baseline, --rows abstracts tagged in this process the way a batch job tags them without the engine
(``predict_and_store`` chunk by chunk, one commit per chunk), and --rows others as a batch stored and queued as an
upload does it, timed from the enqueue to the job's ``finished`` (queue, claim, heartbeat per chunk included). The
worker's RSS is sampled every 0.2 s. Both sides use ORT_THREADS (default 1, as render.yaml's worker). Prints the best
rows/s of each and their ratio, the worker's RSS idle (models loaded) and at its peak, and the load average before
and after.

    python bench/job_worker.py [--rows 500] [--chunk 32] [--rounds 3] [--redis URL]

Abstracts are the test fixtures' 20, each title numbered so no text repeats (the encoder's LRU cache stays cold).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.http_latency import fixture_abstracts, rss_mb  # noqa: E402
from tests.gunicorn_harness import BIN, app_env  # noqa: E402
from webapp import create_app, jobs  # noqa: E402
from webapp.batch import BATCH_JOBS, ParsedCsv, create_job  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import BatchJob  # noqa: E402
from webapp.serving.registry import import_defaults  # noqa: E402
from webapp.serving.scoring import Submission, predict_and_store  # noqa: E402

SAMPLE_SECONDS = 0.2


def papers(n: int, tag: str) -> list[tuple[str, str]]:
    abstracts = fixture_abstracts()
    return [(f"{tag} {i}: {abstracts[i % 20]['title']}", abstracts[i % 20]["abstract"]) for i in range(n)]


def stored_batch(rows: list[tuple[str, str]]) -> int:
    """A batch job stored as an upload stores it (rows already checked), queued as the upload queues it."""
    parsed = ParsedCsv(["title", "abstract"], 0, 1, [(i + 2, [t, a], None) for i, (t, a) in enumerate(rows)])
    job_id = create_job("bench.csv", parsed, created_by="bench").id
    jobs.enqueue(BATCH_JOBS, job_id)
    return job_id


def wait_finished(job_id: int) -> None:
    while True:
        db.session.expire_all()
        job = db.session.get(BatchJob, job_id)
        if job.status == "failed":
            raise SystemExit(f"batch {job_id} failed: {job.error}")
        if job.status == "finished":
            return
        time.sleep(0.02)


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_mb(self.pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=32, help="BATCH_CHUNK_SIZE: rows per commit")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each; the best counts")
    parser.add_argument("--redis", default="", help="a Redis URL for the queue (default: Huey's SQLite storage)")
    args = parser.parse_args()
    os.environ.setdefault("ORT_THREADS", "1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="papertag-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "config.py").write_text(f"BATCH_CHUNK_SIZE = {args.chunk}\n")
        env = app_env(data, "", REDIS_URL=args.redis, DEFAULT_BUNDLES_DIR=str(REPO / "models"))
        env["ORT_THREADS"] = os.environ["ORT_THREADS"]
        subprocess.run([str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], cwd=REPO, env=env, check=True)
        app = create_app({"DATA_DIR": str(data), "REDIS_URL": args.redis, "SECRET_KEY": "bench" * 8})
        with app.app_context():
            import_defaults(str(REPO / "models"))
            predict_and_store([Submission(*papers(1, "warm-up")[0])], "bench")  # load the models first
            log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115 - the worker writes it until it ends
            worker = subprocess.Popen(
                [str(BIN / "flask"), "--app", "wsgi", "jobs", "worker"], cwd=REPO, env=env, stdout=log, stderr=log
            )
            try:
                wait_finished(stored_batch(papers(4, "warm-up")))  # the worker loads its models on its first job
                idle = rss_mb(worker.pid)
                sampler = Sampler(worker.pid)
                sampler.start()
                baseline = engine = 0.0
                for round_ in range(args.rounds):  # alternated, best of each: a busy shared machine disturbs both
                    rows = papers(args.rows, f"baseline {round_}")
                    start = time.perf_counter()
                    for at in range(0, len(rows), args.chunk):
                        predict_and_store([Submission(t, a) for t, a in rows[at : at + args.chunk]], "bench")
                    baseline = max(baseline, len(rows) / (time.perf_counter() - start))
                    job_id = stored_batch(papers(args.rows, f"engine {round_}"))
                    start = time.perf_counter()
                    wait_finished(job_id)
                    engine = max(engine, args.rows / (time.perf_counter() - start))
                sampler.stop.set()
                sampler.join()
            finally:
                worker.terminate()
                worker.wait(timeout=60)
    queue = "Redis" if args.redis else "Huey's SQLite storage"
    print(f"{args.rows} rows, {args.chunk} per commit, ORT_THREADS={os.environ['ORT_THREADS']}, queue on {queue}")
    print(f"  in-process predict_and_store (baseline): {baseline:.1f} rows/s")
    print(f"  batch job through a worker process:      {engine:.1f} rows/s  ({engine / baseline:.2f}x the baseline)")
    print(f"  worker RSS: {idle:.0f} MiB idle with the models loaded, {max(sampler.peak, idle):.0f} MiB peak")
    print(f"  load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
