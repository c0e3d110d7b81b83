"""Memory under load: each gunicorn worker's RSS idle, at its peak during a bounded mixed load, right after it and
after some idle seconds, and the whole service's (master + workers) against a Render plan's memory.

Starts ``gunicorn -c gunicorn.conf.py wsgi:app`` on a temporary DATA_DIR with the shipped models (``models/*``, or
--bundle), as ``bench/http_latency.py`` does (its ``Server``), with --workers and --threads (GUNICORN_THREADS).
After a warm-up it runs --clients clients for --seconds, each cycling through: one abstract, a 64-abstract batch,
a history page, similar papers of a stored prediction, and an explanation of a new 20,000-character abstract
(API, then the page form). RSS is sampled every half second; the peak is what an out-of-memory killer sees.
Prints the figures, the ratios after/idle, the load average before and after, and the check against --plan-mb.

    python bench/memory.py [--seconds 90] [--clients 8] [--workers 2] [--threads 2] [--idle 10] [--plan-mb 488]
        [--json FILE]

ORT_THREADS in the environment reaches the server (as every setting does). bench/results/memory-starter.json is
the run of render.yaml's configuration that tests/test_explain_limits.py holds the blueprint to.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.explain_latency import lengthened  # noqa: E402
from bench.http_latency import Server, batch_of, cores, fixture_abstracts, rss_mb  # noqa: E402
from webapp.serving.bundle import read_manifest  # noqa: E402

# Memory figures are in MiB, as /proc reports them; a plan's "512 MB" is taken as 512e6 bytes (488 MiB), the
# stricter reading.
SAMPLE_SECONDS = 0.5
KINDS = ("single", "batch64", "history", "similar", "explain")


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Sampler(threading.Thread):
    """RSS of the master and of each worker every ``SAMPLE_SECONDS``; keeps each process's peak."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.peaks, self.master_peak = server, {}, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        assert self.server.process is not None
        while not self.done.wait(SAMPLE_SECONDS):
            self.master_peak = max(self.master_peak, rss_mb(self.server.process.pid))
            for pid, rss in worker_rss(self.server).items():
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), rss)


def worker_rss(server: Server) -> dict[int, float]:
    """RSS of each live worker by pid (``Server.worker_rss`` without losing which worker is which)."""
    assert server.process is not None
    pids = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return {int(pid): rss_mb(int(pid)) for pid in pids}


def mixed_load(server: Server, clients: int, seconds: float) -> Counter[str]:
    """``clients`` threads cycling through the mix until ``seconds`` have passed; counts answers by kind:status."""
    papers = fixture_abstracts()
    long_papers = lengthened(papers, 20_000)
    slug = read_manifest(server.bundles[0]).taxonomy_slug
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stored: list[int] = []
    serial = itertools.count()
    deadline = time.monotonic() + seconds

    def predict(body: dict) -> list[int]:
        status, payload = request(server.port, "POST", "/api/v1/predict", body)
        return [p["id"] for p in json.loads(payload)["predictions"]] if status == 200 else []

    def step(kind: str) -> int:
        n = next(serial)
        paper = papers[n % len(papers)]
        if kind == "single":
            ids = predict({"title": f"Load {n}", "abstract": paper["abstract"]})
            stored.extend(ids)
            return 200 if ids else 500
        if kind == "batch64":
            ids = predict({"abstracts": batch_of(papers, f"Load {n}")})
            stored.extend(ids[:4])
            return 200 if ids else 500
        if kind == "history":
            return request(server.port, "GET", f"/history?page={1 + n % 5}")[0]
        if kind == "similar":
            return request(server.port, "GET", f"/api/v1/predictions/{stored[n % len(stored)]}/similar?k=10")[0]
        # A new long abstract each time, so the explanation is computed (then once more as the page reads it).
        long = long_papers[n % len(long_papers)]
        (prediction_id,) = predict({"title": f"Long {n}", "abstract": long["abstract"]}) or (0,)
        api = request(server.port, "GET", f"/api/v1/predictions/{prediction_id}/explanation")[0]
        page = request(server.port, "GET", f"/predictions/{prediction_id}?explain={slug}")[0]
        return max(api, page)

    def client(index: int) -> None:
        for kind in itertools.islice(itertools.cycle(KINDS), index, None):
            if time.monotonic() > deadline:
                return
            try:
                status = step(kind)
            except OSError:
                status = 0
            with lock:
                counts[f"{kind}:{status}"] += 1

    stored.extend(predict({"abstracts": batch_of(papers, "Seed")}))
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", help="bundle directory to serve (default: models/*)")
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the mixed load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "2")))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("GUNICORN_THREADS", "2")))
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle before the last reading")
    parser.add_argument("--plan-mb", type=float, default=488.0, help="the plan's memory in MiB (starter: 512 MB)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    bundles = (
        [Path(b) for b in args.bundle] if args.bundle else sorted(p.parent for p in REPO.glob("models/*/bundle.json"))
    )
    os.environ["GUNICORN_THREADS"] = str(args.threads)  # Server passes its environment on to gunicorn
    server = Server("memory", bundles, args.workers)
    load_before = os.getloadavg()[0]
    print(f"serving {', '.join(b.name for b in bundles)}: {args.workers} workers x {args.threads} threads")
    print(f"machine: {cores()} cores, load average {load_before:.2f} before")
    try:
        server.start(fixture_abstracts()[0]["abstract"])
        for i in range(4 * args.workers):  # every worker has answered (and loaded its models)
            request(server.port, "POST", "/api/v1/predict", {"title": f"Warm {i}", "abstract": "Warm up the model."})
        time.sleep(2)
        assert server.process is not None
        master_idle, idle = rss_mb(server.process.pid), worker_rss(server)
        sampler = Sampler(server)
        sampler.start()
        counts = mixed_load(server, args.clients, args.seconds)
        sampler.done.set()
        sampler.join()
        after = worker_rss(server)
        time.sleep(args.idle)
        rested, master_after = worker_rss(server), rss_mb(server.process.pid)
    finally:
        server.stop()
    load_after = os.getloadavg()[0]
    failed = sum(n for key, n in counts.items() if not key.endswith(":200"))
    print(f"load: {args.seconds:.0f} s, {args.clients} clients, {sum(counts.values())} calls, {failed} not 200")
    print("  " + ", ".join(f"{key} {n}" for key, n in sorted(counts.items())))
    print(f"load average after: {load_after:.2f}")
    print("RSS (MiB)      idle    peak   after  +idle  after/idle")
    for pid in idle:
        print(
            f"worker {pid:<7} {idle[pid]:6.0f}  {sampler.peaks.get(pid, 0):6.0f}  {after.get(pid, 0):6.0f}  "
            f"{rested.get(pid, 0):6.0f}  {rested.get(pid, 0) / idle[pid]:.2f}"
        )
    print(f"master         {master_idle:6.0f}  {sampler.master_peak:6.0f}  {'':6}  {master_after:6.0f}")
    peak_total = sampler.master_peak + sum(sampler.peaks.values())
    print(
        f"service peak (master + workers): {peak_total:.0f} MiB of the plan's {args.plan_mb:.0f} "
        f"({peak_total / args.plan_mb:.0%}); worker peak max {max(sampler.peaks.values(), default=0):.0f} MiB "
        f"(target < 300)"
    )
    if args.json:
        figures = {
            "command": " ".join(["python", *sys.argv]),
            "workers": args.workers,
            "threads": args.threads,
            "ort_threads": os.environ.get("ORT_THREADS", "0"),
            "seconds": args.seconds,
            "clients": args.clients,
            "cores": cores(),
            "load_average": [round(load_before, 2), round(load_after, 2)],
            "calls": dict(counts),
            "worker_idle_mb": sorted(round(v) for v in idle.values()),
            "worker_peak_mb": sorted(round(v) for v in sampler.peaks.values()),
            "worker_after_mb": sorted(round(v) for v in after.values()),
            "worker_after_idle_mb": sorted(round(v) for v in rested.values()),
            "master_mb": [round(master_idle), round(sampler.master_peak), round(master_after)],
            "service_peak_mb": round(peak_total),
            "plan_mb": args.plan_mb,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
