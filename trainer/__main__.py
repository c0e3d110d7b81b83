"""Command line: ``python -m trainer train|evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig
from .data import DataError
from .model import BaseModelError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model and write a bundle")
    train.add_argument("--config", required=True, help="JSON config, e.g. trainer/configs/default.json")
    train.add_argument("--out", default="out/bundle", help="bundle directory to write (replaced atomically)")
    train.add_argument("--base", help="Hugging Face encoder folder (overrides the config's base_model)")
    evaluate = commands.add_parser("evaluate", help="print a bundle's metrics on a labelled file")
    evaluate.add_argument("bundle", help="bundle directory")
    evaluate.add_argument("--data", required=True, help="labelled JSONL/CSV file")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .train import train

    config = TrainConfig.load(args.config)
    bundle = train(config, args.out, base_model=args.base)
    print(bundle)
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
    except (ConfigError, DataError, BaseModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
