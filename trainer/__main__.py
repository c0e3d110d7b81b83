"""Command line: ``python -m trainer train|evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .config import ConfigError, TrainConfig
from .data import DataError
from .model import BaseModelError
from .publish import PublishError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model and write a bundle")
    train.add_argument("--config", required=True, help="JSON config, e.g. trainer/configs/default.json")
    train.add_argument("--out", default="out/bundle", help="bundle directory to write (replaced atomically)")
    train.add_argument("--base", help="Hugging Face encoder folder (overrides the config's base_model)")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--publish", metavar="URL", help="site to read corrections from and register the bundle with")
    where.add_argument("--database", metavar="URL", help="site database to read corrections from and register with")
    train.add_argument(
        "--token",
        default=os.environ.get("PAPERTAG_TOKEN"),
        help="admin API token for --publish (default: $PAPERTAG_TOKEN)",
    )
    train.add_argument("--force", action="store_true", help="activate even if the promotion gate fails")
    evaluate = commands.add_parser("evaluate", help="print a bundle's metrics on a labelled file")
    evaluate.add_argument("bundle", help="bundle directory")
    evaluate.add_argument("--data", required=True, help="labelled JSONL/CSV file")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .publish import DatabaseTarget, SiteTarget, publish
    from .train import test_split, train

    config = TrainConfig.load(args.config)
    target = None
    if args.publish:
        target = SiteTarget(args.publish, args.token)
    elif args.database:
        target = DatabaseTarget(args.database)
    if target is None:
        print(train(config, args.out, base_model=args.base))
        return 0
    # Read corrections first: an unreachable site or a refused token fails now, not after an hour of training.
    corrections = target.corrections(config.taxonomy_slug)
    run_id = target.start_run(config.taxonomy_slug, asdict(config))
    try:
        bundle = train(
            config,
            args.out,
            corrections=corrections,
            base_model=args.base,
            progress=lambda update: target.report(run_id, update),
        )
        outcome = publish(target, bundle, test_split(config, corrections), force=args.force)
    except Exception as exc:
        target.report(run_id, {"status": "failed", "error": f"{exc.__class__.__name__}: {exc}"})
        raise
    target.report(
        run_id,
        {
            "status": "finished",
            "candidate_version": outcome["version"],
            "activated": outcome["activated"],
            "gate": outcome["gate"],
        },
    )
    print(json.dumps(outcome, indent=2))
    print(outcome["version"])
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_bundle

    result = evaluate_bundle(Path(args.bundle), Path(args.data))
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    handlers = {"train": run_train, "evaluate": run_evaluate}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, BaseModelError, PublishError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
