"""Swap time: from `flask models activate` until every gunicorn worker serves the new version.

Starts papertag for real (a temporary DATA_DIR, `flask db upgrade`, `flask models import`, gunicorn with
--workers workers on loopback), imports a bundle and a twin of it (the same encoder, head and tokenizer, thresholds
nudged, so it is another version; with --new-encoder its encoder bytes differ too, so a swap loads an encoder),
then activates them in turn with the CLI, --rounds times, and after each activation polls /healthz until every
worker reports the new version. Prints, per activation, the seconds from the activation's commit and from the
CLI's start (the operator's view, which adds the CLI's own start-up), then the median and the maximum. The first
activation of each version also unpacks it from the database into the worker's model cache; later ones load from
the cache.

    python bench/swap_time.py [--bundle models/research-tasks] [--workers 2] [--rounds 6] [--poll 1.0] [--new-encoder]

Without --bundle it uses the first format-2 bundle under models/, else a MiniLM-L6-shaped int8 bundle with random
weights (the default model's shape, built by bench/http_latency.py) and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.http_latency import cores, fallback_bundles, format2_bundles  # noqa: E402
from tests.gunicorn_harness import activated_at, app_env, flask_cli, gunicorn, wait_all_workers  # noqa: E402
from webapp.serving.bundle import ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE, read_manifest, write_bundle  # noqa: E402


def twin(bundle: Path, target: Path, *, new_encoder: bool = False) -> Path:
    """The same model as another version: the same encoder, head and tokenizer files, thresholds nudged and a new
    created_at, so its archive (and so its id) differs. It shares the encoder with the original (a server reuses the
    loaded encoder and its cache of readings), as a head retrained on the frozen encoder does. ``new_encoder``: the
    same graph with one more metadata entry, so the bytes (and the encoder's identity) differ at the same cost, as
    after fine-tuning the encoder."""
    manifest = read_manifest(bundle)
    nudged = dataclasses.replace(
        manifest,
        thresholds=[min(0.99, t + 0.01) for t in manifest.thresholds],
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    with tempfile.TemporaryDirectory() as tmp:
        encoder = bundle / ENCODER_FILE
        if new_encoder:
            graph = onnx.load(str(encoder))
            graph.metadata_props.add(key="papertag-bench-twin", value=f"{target.name} {nudged.created_at}")
            encoder = Path(tmp) / ENCODER_FILE
            onnx.save(graph, str(encoder))
        return write_bundle(target, nudged, encoder, bundle / HEAD_FILE, bundle / TOKENIZER_FILE)


def default_bundle(cache: Path) -> tuple[Path, str]:
    """The first shipped format-2 bundle, else a bundle of the default model's shape; with a note saying which."""
    shipped, skipped = format2_bundles(REPO / "models")
    if shipped:
        return shipped[0], "; ".join(skipped)
    skipped.append("no format-2 bundle under models/: a MiniLM-L6-shaped int8 bundle with random weights")
    return fallback_bundles(cache)[0], "; ".join(skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle directory (default: the first format-2 one under models/)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="activations to time (alternating two versions)")
    parser.add_argument(
        "--poll", default="1.0", help="MODEL_POLL_SECONDS for the workers (default 1.0, the app's; the tests use 0.5)"
    )
    parser.add_argument(
        "--new-encoder", action="store_true", help="the twin carries other encoder bytes (as after fine-tuning)"
    )
    parser.add_argument("--cache", default=str(REPO / "instance" / "bench-cache"), help="where built models are kept")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    bundle, note = (Path(args.bundle), "") if args.bundle else default_bundle(cache)
    slug = read_manifest(bundle).taxonomy_slug
    print(f"bundle: {bundle}{' (' + note + ')' if note else ''}; machine: {cores()} cores, {args.workers} workers")
    print(
        "twin: other encoder bytes (each swap loads an encoder)"
        if args.new_encoder
        else "twin: the same encoder.onnx (a swap loads only the head: the encoder is reused)"
    )

    with tempfile.TemporaryDirectory(prefix="papertag-swap-") as tmp:
        # Always set: the test harness's environment would otherwise poll every 0.5 s, not the app's 1.0.
        settings = {"WEB_CONCURRENCY": str(args.workers), "LOG_LEVEL": "warning", "MODEL_POLL_SECONDS": args.poll}
        env = app_env(Path(tmp) / "data", "", **settings)
        flask_cli(env, "db", "upgrade")
        versions = [
            flask_cli(env, "models", "import", str(source)).splitlines()[-1]
            for source in (bundle, twin(bundle, Path(tmp) / "twin", new_encoder=args.new_encoder))
        ]
        from_commit: list[float] = []
        from_cli: list[float] = []
        with gunicorn(env, Path(tmp) / "gunicorn.log") as server:
            port = int(env["PORT"])
            for round_ in range(args.rounds):
                version = versions[(round_ + 1) % 2]  # the twin first: versions[0] is active after its import
                cli_started = time.time()
                flask_cli(env, "models", "activate", version)
                commit = activated_at(env, version)
                wait_all_workers(port, server.pid, version, since=commit, slug=slug)
                done = time.time()
                from_commit.append(done - commit)
                from_cli.append(done - cli_started)
                print(
                    f"activation {round_ + 1}: {version} on every worker {from_commit[-1]:.2f} s after the commit, "
                    f"{from_cli[-1]:.2f} s after `flask models activate` started"
                )
    print(
        f"swap to every worker ({args.workers} workers, MODEL_POLL_SECONDS={args.poll}): "
        f"from the commit median {statistics.median(from_commit):.2f} s, max {max(from_commit):.2f} s; "
        f"from the CLI's start median {statistics.median(from_cli):.2f} s, max {max(from_cli):.2f} s"
    )


if __name__ == "__main__":
    main()
