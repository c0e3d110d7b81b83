"""Job worker processes on a CSV batch: what the job engine costs beside the tagging itself, how much a second worker
process on the same batch adds, and a worker's memory.

On a temporary DATA_DIR with the shipped models (``models/*``), it starts ``flask --app wsgi jobs worker`` and runs
a 4-row batch through it (the worker loads its models on its first job). Then, --rounds times, in turn:

- the baseline: --rows abstracts tagged in this process the way a batch job tags them without the engine
  (``predict_and_store`` chunk by chunk, one commit per chunk);
- one worker: --rows others as a batch stored and queued as an upload does it, tagged by that worker, timed from the
  enqueue to the batch's ``finished`` (queue, claim and commit of every chunk included);
- two workers: a second worker process started (and waited for until its consumer runs), --rows others as one
  batch that both tag chunk by chunk, then the second worker stopped (SIGTERM).

Each batch's progress is polled every 0.1 s; besides its rate from enqueue to ``finished``, its steady rate is read
between 10% and 90% of its rows (the second worker loads its models on its first chunk, before 10% at these sizes).
The workers' CPU time per row is read from /proc (what sharing a batch costs beside the work, whatever else the
machine runs). The first worker's RSS is sampled every 0.2 s. Every side uses ORT_THREADS (default 1, as a job
worker's own default and render.yaml's worker service). Prints the best of each over the rounds, the ratios (one
worker against the baseline; two workers against one, same batch size), the chunks each of the two workers took, the
CPU per row, the workers' RSS, and ``uptime`` before and after.

    python bench/job_worker.py [--rows 500] [--chunk 32] [--rounds 3] [--redis URL]

Abstracts are the test fixtures' 20, each title numbered so no text repeats (the encoder's LRU cache stays cold).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from bench.http_latency import fixture_abstracts, rss_mb  # noqa: E402
from tests.gunicorn_harness import BIN, app_env  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.jobs.batch import ParsedCsv, create_job, queue_job  # noqa: E402
from webapp.models import BatchChunk, BatchJob  # noqa: E402
from webapp.serving.registry import import_defaults  # noqa: E402
from webapp.serving.scoring import Submission, predict_and_store  # noqa: E402

SAMPLE_SECONDS = 0.2
POLL_SECONDS = 0.1


@dataclass
class Run:
    """One batch through the engine: rows/s from enqueue to finished and between 10% and 90% of its rows, and the
    CPU seconds its workers spent per 100 rows."""

    whole: float
    steady: float
    cpu: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def papers(n: int, tag: str) -> list[tuple[str, str]]:
    abstracts = fixture_abstracts()
    return [(f"{tag} {i}: {abstracts[i % 20]['title']}", abstracts[i % 20]["abstract"]) for i in range(n)]


def stored_batch(rows: list[tuple[str, str]]) -> int:
    """A batch job stored as an upload stores it (rows already checked), queued as the upload queues it."""
    parsed = ParsedCsv(["title", "abstract"], 0, 1, [(i + 2, [t, a], None) for i, (t, a) in enumerate(rows)])
    job_id = create_job("bench.csv", parsed, created_by="bench").id
    queue_job(job_id)
    return job_id


def run_batch(rows: list[tuple[str, str]], pids: list[int]) -> tuple[int, Run]:
    """Store and queue ``rows`` as a batch and poll it until ``finished``; its id and figures (workers ``pids``)."""
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    job_id = stored_batch(rows)
    start = time.perf_counter()
    progress: list[tuple[float, int]] = []
    while True:
        db.session.expire_all()
        job = db.session.get(BatchJob, job_id)
        progress.append((time.perf_counter(), job.processed))
        if job.status == "failed":
            raise SystemExit(f"batch {job_id} failed: {job.error}")
        if job.status == "finished":
            break
        time.sleep(POLL_SECONDS)

    def reached(share: float) -> float:
        """When the share of rows done was reached (linear between polls)."""
        goal = share * len(rows)
        for (t0, p0), (t1, p1) in zip(progress, progress[1:], strict=False):
            if p1 >= goal:
                return t0 + (t1 - t0) * ((goal - p0) / (p1 - p0) if p1 > p0 else 1.0)
        return progress[-1][0]

    cpu = 100 * (sum(cpu_seconds(pid) for pid in pids) - cpu_before) / len(rows)
    return job_id, Run(len(rows) / (progress[-1][0] - start), 0.8 * len(rows) / (reached(0.9) - reached(0.1)), cpu)


def best(runs: list[Run]) -> Run:
    return Run(max(r.whole for r in runs), max(r.steady for r in runs), min(r.cpu for r in runs))


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``flask --app wsgi jobs worker``, once its consumer runs (it logs so)."""
    with open(log, "wb") as out:  # the process keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(BIN / "flask"), "--app", "wsgi", "jobs", "worker"], cwd=REPO, env=env, stdout=out, stderr=out
        )
    while "job worker" not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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
    parser.add_argument("--chunk", type=int, default=32, help="BATCH_CHUNK_SIZE: rows per chunk (one commit each)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three, in turn; the best of each counts")
    parser.add_argument("--redis", default="", help="a Redis URL for the queue (default: Huey's SQLite storage)")
    args = parser.parse_args()
    os.environ.setdefault("ORT_THREADS", "1")
    before = uptime()
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
            worker = start_worker(env, Path(tmp) / "worker-1.log")
            try:
                run_batch(papers(4, "warm-up"), [worker.pid])  # the worker loads its models on its first job
                idle = rss_mb(worker.pid)
                sampler = Sampler(worker.pid)
                sampler.start()
                baseline, one, two, taken, second_peak = 0.0, [], [], Counter(), 0.0
                for round_ in range(args.rounds):  # in turn, best of each: a busy shared machine disturbs all
                    rows = papers(args.rows, f"baseline {round_}")
                    start = time.perf_counter()
                    for at in range(0, len(rows), args.chunk):
                        predict_and_store([Submission(t, a) for t, a in rows[at : at + args.chunk]], "bench")
                    baseline = max(baseline, len(rows) / (time.perf_counter() - start))
                    one.append(run_batch(papers(args.rows, f"one {round_}"), [worker.pid])[1])
                    second = start_worker(env, Path(tmp) / f"worker-2-{round_}.log")
                    try:
                        job_id, run = run_batch(papers(args.rows, f"two {round_}"), [worker.pid, second.pid])
                        two.append(run)
                        second_peak = max(second_peak, rss_mb(second.pid))
                    finally:
                        stop(second)
                    holders = db.session.scalars(select(BatchChunk.worker).where(BatchChunk.job_id == job_id))
                    taken.update("first" if h.split(":")[1] == str(worker.pid) else "second" for h in holders)
                sampler.stop.set()
                sampler.join()
            finally:
                stop(worker)
    one_best, two_best = best(one), best(two)
    queue = "Redis" if args.redis else "Huey's SQLite storage"
    threads = os.environ["ORT_THREADS"]
    print(f"{args.rows} rows a batch, {args.chunk} per chunk, ORT_THREADS={threads}, queue on {queue}")
    print(f"  in-process predict_and_store (baseline): {baseline:.1f} rows/s")
    print(
        f"  one worker process:   {one_best.whole:.1f} rows/s enqueue to finished "
        f"({one_best.whole / baseline:.2f}x the baseline), {one_best.steady:.1f} steady (10%-90%)"
    )
    print(
        f"  two worker processes on one batch: {two_best.whole:.1f} rows/s enqueue to finished "
        f"({two_best.whole / one_best.whole:.2f}x one worker), {two_best.steady:.1f} steady "
        f"({two_best.steady / one_best.steady:.2f}x one worker)"
    )
    print(f"  chunks of the two-worker batches taken by the first worker {taken['first']}, second {taken['second']}")
    print(
        f"  workers' CPU seconds per 100 rows: one worker {one_best.cpu:.2f}, two workers {two_best.cpu:.2f} "
        f"({two_best.cpu / one_best.cpu:.2f}x; the second's model loading included)"
    )
    print(
        f"  worker RSS: {idle:.0f} MiB idle with the models loaded, {max(sampler.peak, idle):.0f} MiB peak "
        f"(the second worker: {second_peak:.0f} MiB at the end of its batch)"
    )
    print(f"  uptime before: {before}\n  uptime after:  {uptime()}  ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
