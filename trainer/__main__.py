"""Command line: ``python -m trainer train|evaluate|worker|label-issues|label-duplicates``."""

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
    issues = commands.add_parser(
        "label-issues", help="rank the papers whose labels are likely wrong (cleanlab over out-of-fold scores)"
    )
    issues.add_argument("--config", required=True, help="a frozen-encoder config, e.g. research-tasks-heads.json")
    issues.add_argument("--out", required=True, help="JSONL file to write, lowest label quality first")
    issues.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold scores")
    issues.add_argument("--limit", type=int, default=500, help="papers written, from the top of the queue (0 = all)")
    add_work_dir_argument(issues)
    add_target_arguments(issues)
    duplicates = commands.add_parser(
        "label-duplicates", help="labels of the data differing only by case, separators or spelling"
    )
    duplicates.add_argument("--config", required=True, help="training config whose data and aliases are checked")
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


def run_label_issues(args: argparse.Namespace) -> int:
    from .label_issues import issue_rows, score_dataset, write_issues

    config = TrainConfig.load(args.config)
    target = _target(args)
    corrections = target.corrections(config.taxonomy_slug) if target else None
    label_map = target.label_changes(config.taxonomy_slug) if target else None
    scored = score_dataset(
        config, corrections, label_map, folds=args.folds, work_dir=Path(args.work_dir) if args.work_dir else None
    )
    rows = issue_rows(config, scored, args.limit)
    print(write_issues(rows, Path(args.out)))
    print(f"{sum(r['issue'] for r in rows)} of {len(rows)} written papers flagged by cleanlab")
    return 0


def run_label_duplicates(args: argparse.Namespace) -> int:
    """Prints the groups the config's aliases leave, and an alias map merging them; exit 1 when any is left."""
    from collections import Counter

    from .data import read_papers
    from .hygiene import propose_aliases, remaining_duplicates
    from .train import _resolve, label_aliases

    config = TrainConfig.load(args.config)
    aliases = label_aliases(config)
    counts = Counter(
        aliases.get(label, label)
        for name in config.data
        for paper in read_papers(_resolve(name), config.fields)
        for label in paper.labels
    )
    left = remaining_duplicates(counts, {})
    for group in left:
        print(" = ".join(f"{label} ({counts[label]})" for label in group))
    print(json.dumps({**aliases, **propose_aliases(counts)}, indent=2, ensure_ascii=False))
    print(f"{len(left)} duplicate group(s) left after the config's {len(aliases)} aliases")
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {
        "train": run_train,
        "evaluate": run_evaluate,
        "worker": run_worker,
        "label-issues": run_label_issues,
        "label-duplicates": run_label_duplicates,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, BaseModelError, PublishError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
