"""Train-and-publish, for one CLI run or for each training run queued from the site (the worker)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig
from .publish import Target, publish
from .train import REPO_ROOT, test_split, train

log = logging.getLogger(__name__)
CONFIG_DIR = REPO_ROOT / "trainer" / "configs"


def train_and_publish(
    target: Target,
    config: TrainConfig,
    out: Path,
    *,
    run_id: int | None = None,
    base_model: str | None = None,
    force: bool = False,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Corrections in, bundle out, through the gate; the run record follows every step (failures too)."""
    # Read corrections first: an unreachable site or a refused token fails now, not after an hour of training.
    corrections = target.corrections(config.taxonomy_slug)
    label_map = target.label_changes(config.taxonomy_slug)
    if run_id is None:
        run_id = target.start_run(config.taxonomy_slug, asdict(config))
    report = partial(target.report, run_id)  # every phase, training's and publishing's, goes to the run record
    try:
        bundle = train(
            config,
            out,
            corrections=corrections,
            base_model=base_model,
            progress=report,
            label_map=label_map,
            work_dir=work_dir,
        )
        outcome = publish(target, bundle, test_split(config, corrections, label_map), force=force, progress=report)
    except Exception as exc:
        target.report(run_id, {"status": "failed", "error": f"{exc.__class__.__name__}: {exc}"})
        raise
    target.report(run_id, {"status": "finished", "candidate_version": outcome["version"], "gate": outcome["gate"]})
    return outcome


def config_for(run: dict[str, Any]) -> TrainConfig:
    """A queued run names a config file in ``trainer/configs`` (``{"config": "default"}``)."""
    name = str((run.get("config") or {}).get("config") or run["taxonomy"])
    path = CONFIG_DIR / f"{name}.json"
    if "/" in name or not path.is_file():
        raise ConfigError(f"training run {run['id']} names config {name!r}, which is not in {CONFIG_DIR}")
    config = TrainConfig.load(path)
    if config.taxonomy_slug != run["taxonomy"]:
        raise ConfigError(f"config {name!r} trains {config.taxonomy_slug!r}, not the run's {run['taxonomy']!r}")
    return config


def work(
    target: Target,
    runs_dir: Path,
    *,
    once: bool = False,
    poll_seconds: float = 10.0,
    work_dir: str | Path | None = None,
) -> int:
    """Process queued runs until stopped (or one pass with ``once``). Returns how many runs finished."""
    finished = 0
    while True:
        run = target.claim()
        if run is None:
            if once:
                return finished
            time.sleep(poll_seconds)
            continue
        log.info("claimed training run %s for %s", run["id"], run["taxonomy"])
        try:
            config = config_for(run)
            train_and_publish(target, config, runs_dir / f"run-{run['id']}", run_id=run["id"], work_dir=work_dir)
            finished += 1
        except ConfigError as exc:
            target.report(run["id"], {"status": "failed", "error": str(exc)})
            log.error("training run %s failed: %s", run["id"], exc)
        except Exception:  # one failed run must not stop the worker; the run record holds the error
            log.exception("training run %s failed", run["id"])
        if once:
            return finished
