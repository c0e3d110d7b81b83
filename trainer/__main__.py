"""Command line: ``python -m trainer train|evaluate|worker``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from webapp.serving.bundle import BundleError

from .config import ConfigError, TrainConfig
from .data import DataError
from .model import BaseModelError
from .publish import PublishError, Target


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--publish", metavar="URL", help="site to read corrections from and register bundles with")
    where.add_argument("--database", metavar="URL", help="site database to read corrections from and register with")
    parser.add_argument(
        "--token",
        default=os.environ.get("PAPERTAG_TOKEN"),
        help="admin API token for --publish (default: $PAPERTAG_TOKEN)",
    )


def add_work_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        default=None,
        help="cache of fine-tuned encoders and encoded abstracts, reused by later runs (default: out/work)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model and write a bundle")
    train.add_argument("--config", required=True, help="JSON config, e.g. trainer/configs/default.json")
    train.add_argument("--out", default="out/bundle", help="bundle directory to write (replaced atomically)")
    train.add_argument("--base", help="Hugging Face encoder folder (overrides the config's base_model)")
    add_work_dir_argument(train)
    add_target_arguments(train)
    train.add_argument("--force", action="store_true", help="activate even if the promotion gate fails")
    worker = commands.add_parser("worker", help="train the runs queued from the site, one after another")
    add_target_arguments(worker)
    worker.add_argument("--runs-dir", default="runs", help="where each run's bundle is written")
    worker.add_argument("--once", action="store_true", help="process at most one queued run, then exit")
    worker.add_argument("--poll", type=float, default=10.0, help="seconds between checks for queued runs")
    add_work_dir_argument(worker)
    evaluate = commands.add_parser("evaluate", help="print a bundle's metrics on a labelled file")
    evaluate.add_argument("bundle", help="bundle directory")
    evaluate.add_argument("--data", required=True, help="labelled JSONL/CSV file")
    evaluate.add_argument(
        "--config", help="a training config whose `fields` map the file's field names (e.g. pmid -> id)"
    )
    return parser


def _target(args: argparse.Namespace) -> Target | None:
    from .publish import DatabaseTarget, SiteTarget

    if args.publish:
        return SiteTarget(args.publish, args.token)
    if args.database:
        return DatabaseTarget(args.database)
    return None


def run_train(args: argparse.Namespace) -> int:
    from .train import train
    from .worker import train_and_publish

    config = TrainConfig.load(args.config)
    target = _target(args)
    if target is None:
        print(train(config, args.out, base_model=args.base, work_dir=args.work_dir))
        return 0
    outcome = train_and_publish(
        target, config, Path(args.out), base_model=args.base, force=args.force, work_dir=args.work_dir
    )
    print(json.dumps(outcome, indent=2))
    print(outcome["version"])
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .worker import work

    target = _target(args)
    if target is None:
        raise PublishError("the worker needs --publish URL or --database URL")
    finished = work(target, Path(args.runs_dir), once=args.once, poll_seconds=args.poll, work_dir=args.work_dir)
    print(f"{finished} training run(s) finished")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_bundle

    fields = TrainConfig.load(args.config).fields if args.config else None
    result = evaluate_bundle(Path(args.bundle), Path(args.data), fields)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"train": run_train, "evaluate": run_evaluate, "worker": run_worker}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, BaseModelError, PublishError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
