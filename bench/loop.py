"""The correction loop, end to end: curators correct K of the newest papers through the API, the trainer retrains
from those corrections on the frozen encoder, and the new model is scored on the newest papers nobody corrected.

1. Reads the config's splits (trainer.train.load_dataset) and sorts the *newest* split by arXiv id. The oldest of
   them are the ones curators correct (K = 0, 200, 500, 1000 by default, accumulating); the newest papers after the
   largest K are the evaluation set ("remaining"), the same for every K. Ks that would leave fewer than
   --min-remaining papers are dropped (and the script says so).
2. Starts a real site in a temporary DATA_DIR (SQLite) on a loopback port (`flask db upgrade`, `flask models
   import BUNDLE`, `flask tokens create ... --role curator`, then werkzeug serving the app in a thread).
3. For each K: posts the next papers to `POST /api/v1/predict` (64 a call), records each one's data-set labels as
   a correction with `POST /api/v1/predictions/<id>/annotations` (with a note, so a confirmation of a prediction
   that was already right is recorded too), reads the corrections back with trainer.publish.SiteTarget (what
   `python -m trainer train --publish URL` does) and times trainer.train.train on them. The site accepts only the
   taxonomy's labels, so a correction holds the paper's labels that the taxonomy knows; a paper with none of them
   is not corrected (counted as "skipped").
4. Scores each new bundle, and the active one, on the remaining papers with trainer.evaluate.evaluate_papers (the
   decision the server makes: thresholds, best guess, off-domain flag) and prints one row per model.

    python bench/loop.py [--config trainer/configs/research-tasks-heads.json] [--ks 0,200,500,1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from werkzeug.serving import make_server  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Paper, arxiv_order  # noqa: E402
from trainer.evaluate import evaluate_papers  # noqa: E402
from trainer.publish import SiteTarget  # noqa: E402
from trainer.train import load_dataset, train  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER  # noqa: E402
from webapp.serving.bundle import read_manifest  # noqa: E402
from webapp.serving.registry import EXTENSION_KEY as LIVE_MODELS  # noqa: E402

MAX_BATCH = 64  # abstracts per POST /api/v1/predict
COLUMNS = (
    "model",
    "labels",
    "corrections",
    "skipped",
    "train",
    "encoded",
    "retrain_s",
    "cpu_s",
    "micro_f1",
    "macro_f1",
    "hit@3",
    "empty",
)


@dataclass
class Row:
    """One model's line of the learning curve."""

    model: str
    labels: int
    corrections: int | str = "-"
    skipped: int | str = "-"
    train: int | str = "-"
    encoded: int | str = "-"
    retrain_s: float | str = "-"
    cpu_s: float | str = "-"
    figures: dict[str, Any] | None = None

    def cells(self) -> list[str]:
        figures = self.figures or {}
        metrics = [figures.get(k) for k in ("micro_f1", "macro_f1", "hit_at_3", "empty_share")]
        counts = [self.labels, self.corrections, self.skipped, self.train, self.encoded]
        times = [f"{t:.1f}" if isinstance(t, float) else t for t in (self.retrain_s, self.cpu_s)]
        return [self.model, *map(str, counts), *times] + ["-" if m is None else f"{m:.3f}" for m in metrics]


@dataclass
class Retrain:
    """One retrain from the site's corrections."""

    bundle: Path
    seconds: float  # wall clock: reading the corrections + training
    cpu_seconds: float  # CPU time of this process (all its threads) meanwhile
    corrections: int
    encoded: int  # abstracts the run had to encode (not in the work dir's cache)


def parse_ks(text: str) -> list[int]:
    """``"0,200,500"`` -> ``[0, 200, 500]`` (sorted, without repeats)."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--ks takes comma-separated whole numbers, not {text!r}") from exc
    if not ks or ks[0] < 0:
        raise argparse.ArgumentTypeError("--ks needs at least one number, none negative")
    return ks


def newest_papers(config: TrainConfig) -> list[Paper]:
    """The config's *newest* split (no corrections applied), oldest arXiv id first."""
    splits, _ = load_dataset(config)
    return sorted(splits["newest"], key=lambda p: (arxiv_order(p.id) or (0, 0, 0), p.id))


def fitting_ks(ks: list[int], available: int, min_remaining: int) -> tuple[list[int], list[int]]:
    """The Ks that leave at least ``min_remaining`` newest papers to evaluate on, and the ones that do not."""
    kept = [k for k in ks if k + min_remaining <= available]
    return kept, [k for k in ks if k not in kept]


def load_line() -> str:
    """What ``uptime`` says (the load average), or os.getloadavg() where there is no uptime command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cached_readings(work_dir: Path) -> int:
    """Encoded abstracts in the trainer's reading cache (every encoder), to count what a retrain had to encode."""
    total = 0
    for path in (work_dir / "readings").glob("*.npz"):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as data:
            total += len(data["keys"])
    return total


class Site:
    """A papertag site on a temporary SQLite DATA_DIR, served on a loopback port, with one curator token."""

    def __init__(self, data_dir: Path, bundle: Path) -> None:
        self.app = create_app(
            {
                "DATA_DIR": str(data_dir),
                "DATABASE_URL": "",
                "SECRET_KEY": "bench-loop",
                "RATELIMIT_ENABLED": False,
                "DEFAULT_BUNDLES_DIR": str(data_dir / "no-default-models"),
            }
        )
        self._cli("db", "upgrade")
        self.version = self._cli("models", "import", str(bundle))
        self.token = self._cli("tokens", "create", "loop-curator", "--role", "curator", "--label", "bench/loop.py")
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def _cli(self, *args: str) -> str:
        """Run a ``flask --app wsgi ...`` command on this site; returns its last output line."""
        result = self.app.test_cli_runner().invoke(args=list(args))
        if result.exit_code != 0:
            raise RuntimeError(f"flask {' '.join(args)} failed: {result.output.strip() or result.exception!r}")
        lines = result.output.strip().splitlines()
        return lines[-1].strip() if lines else ""

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; any error status stops the run with the site's message."""
        response = self.http.request(method, self.url + path, timeout=120, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def taxonomy_labels(self, slug: str) -> set[str]:
        """The labels a correction of ``slug`` may use (the active version's, as GET /api/v1/taxonomies lists)."""
        taxonomies = self.call("GET", "/api/v1/taxonomies")["taxonomies"]
        found = next((t for t in taxonomies if t["slug"] == slug), None)
        if found is None:
            raise RuntimeError(f"the site has no taxonomy {slug!r} (it has {[t['slug'] for t in taxonomies]})")
        return set(found["labels"]) | set(found.get("accepted_labels", []))

    def predict(self, papers: list[Paper]) -> list[int]:
        """Prediction ids of ``papers``, posted to POST /api/v1/predict in batches of at most 64."""
        ids: list[int] = []
        for start in range(0, len(papers), MAX_BATCH):
            chunk = papers[start : start + MAX_BATCH]
            body = {"abstracts": [{"title": p.title, "abstract": p.abstract} for p in chunk]}
            ids.extend(p["id"] for p in self.call("POST", "/api/v1/predict", json=body)["predictions"])
        return ids

    def correct(self, prediction_id: int, slug: str, labels: list[str]) -> None:
        note = "bench/loop.py: the data set's labels"
        body = {"taxonomy": slug, "labels": labels, "note": note}
        self.call("POST", f"/api/v1/predictions/{prediction_id}/annotations", json=body)

    def close(self) -> None:
        self.server.shutdown()
        self.app.extensions[LIVE_MODELS].stop()
        self.app.extensions[BATCH_WORKER].stop()


@contextmanager
def running_site(data_dir: Path, bundle: Path) -> Iterator[Site]:
    site = Site(data_dir, bundle)
    try:
        yield site
    finally:
        site.close()


def curate(site: Site, papers: list[Paper], slug: str, known: set[str]) -> int:
    """Predict ``papers`` through the API and correct each to its data-set labels (those the taxonomy knows).
    Returns how many were skipped because none of their labels is in the taxonomy."""
    wanted = [(paper, sorted(set(paper.labels) & known)) for paper in papers]
    chosen = [(paper, labels) for paper, labels in wanted if labels]
    ids = site.predict([paper for paper, _ in chosen])
    for prediction_id, (_, labels) in zip(ids, chosen, strict=True):
        site.correct(prediction_id, slug, labels)
    return len(papers) - len(chosen)


def retrain(site: Site, config: TrainConfig, out: Path, work_dir: Path) -> Retrain:
    """Corrections read back from the site (as the trainer's --publish does), then one training run, timed."""
    before = cached_readings(work_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    target = SiteTarget(site.url, site.token)
    corrections = target.corrections(config.taxonomy_slug)
    label_map = target.label_changes(config.taxonomy_slug)
    bundle = train(config, out, corrections=corrections, label_map=label_map, work_dir=work_dir)
    return Retrain(
        bundle,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        len(corrections),
        cached_readings(work_dir) - before,
    )


def print_table(rows: list[Row]) -> None:
    table = [list(COLUMNS)] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "trainer" / "configs" / "research-tasks-heads.json",
        help="frozen-encoder training config (its `encoder` bundle is served unless --bundle says otherwise)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="bundle the site serves as the active model (default: the config's `encoder` bundle); its taxonomy "
        "must be the config's",
    )
    parser.add_argument(
        "--ks",
        type=parse_ks,
        default=[0, 200, 500, 1000],
        help="newest papers corrected, comma-separated (default 0,200,500,1000)",
    )
    parser.add_argument(
        "--min-remaining", type=int, default=100, help="newest papers that must remain to evaluate on (default 100)"
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "out" / "work", help="trainer cache (encoded texts)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "loop", help="scratch dir: bundles and the site")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the trainer's log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")

    print(f"start: {load_line()}")
    config = TrainConfig.load(args.config)
    if not config.frozen_encoder:
        parser.error(f"{args.config} fine-tunes the encoder; the loop is for frozen-encoder (heads) configs")
    bundle = args.bundle or (Path(config.encoder) if Path(config.encoder).is_absolute() else REPO / config.encoder)
    served = read_manifest(bundle)
    if served.taxonomy_slug != config.taxonomy_slug:
        parser.error(
            f"{bundle} serves {served.taxonomy_slug!r}, the config trains {config.taxonomy_slug!r}: "
            "pass --bundle with a bundle of the config's taxonomy"
        )
    newest = newest_papers(config)
    ks, dropped = fitting_ks(args.ks, len(newest), args.min_remaining)
    if dropped:
        print(
            f"dropped K = {', '.join(map(str, dropped))}: the newest split has {len(newest)} papers and "
            f"{args.min_remaining} must remain"
        )
    if not ks:
        sys.exit("no K fits: use smaller --ks or --min-remaining")
    remaining = newest[max(ks) :]
    print(
        f"config {args.config.name}: newest split {len(newest)} papers ({newest[0].id} .. {newest[-1].id}); "
        f"corrected: the oldest K of them; evaluated on the {len(remaining)} newest ({remaining[0].id} on)"
    )
    if config.baseline:
        print("retrain seconds include reading the corrections and fitting the TF-IDF baseline (config.baseline)")

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [Row(f"active {bundle.name}", len(served.labels), figures=evaluate_papers(bundle, remaining))]
    with (
        tempfile.TemporaryDirectory(prefix="site-", dir=args.out) as data_dir,
        running_site(Path(data_dir), bundle) as site,
    ):
        known = site.taxonomy_labels(config.taxonomy_slug)
        done = 0
        skipped = 0
        for k in ks:
            skipped += curate(site, newest[done:k], config.taxonomy_slug, known)
            done = k
            run = retrain(site, config, args.out / f"k-{k}", args.work_dir)
            made = read_manifest(run.bundle)
            figures = evaluate_papers(run.bundle, remaining)
            train_papers = made.training_data["splits"]["train"]
            rows.append(
                Row(
                    f"K={k}",
                    len(made.labels),
                    run.corrections,
                    skipped,
                    train_papers,
                    run.encoded,
                    run.seconds,
                    run.cpu_seconds,
                    figures,
                )
            )
            print(f"K={k}: {run.corrections} corrections, retrained in {run.seconds:.1f} s", flush=True)
    print()
    print_table(rows)
    print(
        f"\nmetrics on the {len(remaining)} newest papers nobody corrected (labels outside a model's label set are "
        f"ignored); corrections = read back from the site; skipped = papers with no label of the taxonomy; "
        f"train = the run's training papers; encoded = abstracts the run had to encode; retrain_s = wall seconds, "
        f"cpu_s = CPU seconds of this process meanwhile; {os.cpu_count()} CPU cores"
    )
    print(f"end: {load_line()}")


if __name__ == "__main__":
    main()
