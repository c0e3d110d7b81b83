"""The training run: data -> shared encoder (fine-tuned, or reused frozen) -> a head per taxonomy with lexical
evidence -> thresholds -> format-2 bundle, with figures on the random test split and on the newest papers, beside
the TF-IDF baseline.

Designs (embedding head, fusion weight, thresholds, off-domain cut) are chosen on the validation split; the test
and newest splits are only reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from webapp.quality.tuning import tune_thresholds
from webapp.serving.bundle import ENCODER_FILE, TOKENIZER_FILE, Manifest, read_manifest, sha256_file, write_bundle
from webapp.serving.inference import Encoder, LoadedModel, Reading
from webapp.surgery import LabelMap

from . import metrics
from .baseline import tfidf_baseline
from .config import ConfigError, TrainConfig
from .data import (
    DataError,
    Paper,
    apply_aliases,
    arxiv_order,
    choose_labels,
    in_sample,
    merge_corrections,
    multi_hot,
    newest_cutoff,
    read_papers,
    relabel,
    split_of,
)
from .evaluate import served_outputs
from .export import max_abs_difference
from .heads import LinearHead, build_head, choose_head, domain_references
from .hygiene import read_aliases
from .thresholds import choose_min_support, guessing_thresholds

if TYPE_CHECKING:
    from .finetune import Task

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test", "newest")
# Rough CPU rates on 2 cores (bench/train_throughput.py): abstracts fine-tuned per second at 128 tokens, windows
# encoded per second by the int8 encoder. Only for the estimate printed before training starts.
CPU_FINETUNE_RATE = 12.0
# The settings a fine-tuned encoder depends on (with the base model, the labels and the training texts).
FINETUNE_FIELDS = (
    "encoder_layers",
    "max_length",
    "epochs",
    "batch_size",
    "gpu_batch_size",
    "learning_rate",
    "head_learning_rate",
    "weight_decay",
    "warmup_ratio",
    "max_pos_weight",
    "patience",
    "seed",
    "device",
)
CPU_ENCODE_RATE = 90.0
# Part of the reading cache's key: readings made before the encoder read each text in a run of its own depended on
# the texts batched with them, and must not be reused.
READING_RULE = "one run per text"


def _resolve(name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else REPO_ROOT / name


def load_dataset(
    config: TrainConfig, corrections: list[Paper] | None = None, label_map: LabelMap | None = None
) -> tuple[dict[str, list[Paper]], dict]:
    """Base files plus corrections, relabelled by the site's label changes, split deterministically: the newest
    dated papers first (by arXiv id), then train/validation/test by a hash of the id (or test = ``test_data``);
    also a summary for bundle.json."""
    papers: list[Paper] = []
    for name in config.data:
        papers.extend(read_papers(_resolve(name), config.fields))
    papers = list({p.id: p for p in papers}.values())
    papers = [p for p in papers if in_sample(p.id, config.sample_fraction)]
    if config.max_examples:
        papers = papers[: config.max_examples]
    papers, merged = merge_corrections(papers, corrections or [])
    test_papers: list[Paper] = []
    for name in config.test_data:
        test_papers.extend(read_papers(_resolve(name), config.fields))
    aliases = label_aliases(config)
    papers = apply_aliases(papers, aliases)
    papers = relabel(papers, label_map or LabelMap())
    test_papers = relabel(apply_aliases(test_papers, aliases), label_map or LabelMap())
    # Corrections always train: they are what curators asked the model to learn.
    cutoff = newest_cutoff(papers, config.newest_fraction)
    splits: dict[str, list[Paper]] = {name: [] for name in SPLITS}
    for paper in papers:
        order = arxiv_order(paper.id)
        if paper.corrected:
            splits["train"].append(paper)
        elif cutoff is not None and order is not None and order >= cutoff:
            splits["newest"].append(paper)
        else:
            split = split_of(paper.id, config.test_fraction, config.validation_fraction)
            splits["train" if split == "test" and config.test_data else split].append(paper)
    if config.test_data:
        splits["test"] = test_papers
    summary = {
        "files": config.data,
        "test_files": config.test_data,
        "papers": len(papers),
        "label_free_papers": sum(1 for p in papers if not p.labels),
        "corrections": len(corrections or []),
        "corrections_overriding": merged["overridden"],
        "corrections_added": merged["added"],
        "label_changes": [rule.id for rule in (label_map or LabelMap()).rules],
        "label_aliases": len(aliases),
        "splits": {name: len(items) for name, items in splits.items()},
        "split_rule": _split_rule(config, cutoff),
    }
    return splits, summary


def label_aliases(config: TrainConfig) -> dict[str, str]:
    """The config's alias file (data/*/label-aliases.json) with its inline ``label_aliases`` on top."""
    from_file = read_aliases(_resolve(config.label_aliases_file)) if config.label_aliases_file else {}
    return {**from_file, **config.label_aliases}


def _split_rule(config: TrainConfig, cutoff: tuple[int, int, int] | None) -> str:
    newest = "newest: none (no arXiv ids)"
    if cutoff:
        year, month, number = cutoff
        newest = f"newest: arXiv id from {year}-{month:02d} #{number} on ({config.newest_fraction:.0%} of dated papers)"
    test = f"test: {', '.join(config.test_data)}; " if config.test_data else ""
    bounds = f"test < {config.test_fraction}, validation < {config.test_fraction + config.validation_fraction}"
    return f"{newest}; {test}sha256(id) bucket: {bounds}"


def test_split(
    config: TrainConfig, corrections: list[Paper] | None = None, label_map: LabelMap | None = None
) -> list[Paper]:
    """The frozen test papers of this config (with corrections and label changes applied), for the promotion
    gate."""
    splits, _ = load_dataset(config, corrections, label_map)
    return splits["test"]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


class ReadingCache:
    """Pooled vectors per (encoder, windows, text) on disk, so a retrain only encodes texts it has not seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Reading] = {}
        if path.is_file():
            with np.load(path) as data:
                for key, pooled, read, total in zip(
                    data["keys"], data["pooled"], data["read"], data["total"], strict=True
                ):
                    self.entries[str(key)] = Reading(pooled, int(read), int(total))

    def read(self, encoder: Encoder, texts: list[str]) -> list[Reading]:
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self.entries))
        text_of = dict(zip(keys, texts, strict=True))
        for start in range(0, len(todo), 1024):
            chunk = todo[start : start + 1024]
            self.entries.update(zip(chunk, encoder.run([text_of[k] for k in chunk]), strict=True))
            log.info("encoded %d of %d new texts", min(start + 1024, len(todo)), len(todo))
        if todo:
            self.save()
        return [self.entries[k] for k in keys]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.entries)
        staging = self.path.with_suffix(".tmp.npz")
        np.savez(
            staging,
            keys=np.asarray(keys),
            pooled=np.stack([self.entries[k].pooled for k in keys]),
            read=np.asarray([self.entries[k].read_tokens for k in keys]),
            total=np.asarray([self.entries[k].total_tokens for k in keys]),
        )
        staging.replace(self.path)


def read_abstracts(
    config: TrainConfig,
    encoder_path: Path,
    tokenizer_path: Path,
    manifest: Manifest,
    work_dir: Path,
    texts: dict[str, list[str]],
) -> dict[str, list[Reading]]:
    """Each group of texts read by the encoder, through the work dir's cache (a retrain or an out-of-fold scoring
    run only encodes texts it has not seen with this encoder and these windows)."""
    encoder = Encoder(encoder_path, tokenizer_path, manifest, threads=os.cpu_count() or 1)
    windows = (config.max_length, config.max_windows, config.window_overlap)
    key = _fingerprint(sha256_file(encoder_path), windows, READING_RULE)
    cache = ReadingCache(work_dir / "readings" / f"{key}.npz")
    return {name: cache.read(encoder, group) for name, group in texts.items()}


def _minutes(seconds: float) -> str:
    return f"about {max(1, round(seconds / 60))} min on {os.cpu_count()} CPU cores"


def _cores() -> float:
    return max(1, os.cpu_count() or 1) / 2


def _window_manifest(config: TrainConfig, labels: list[str], base: str) -> Manifest:
    return Manifest(
        taxonomy_slug=config.taxonomy_slug,
        taxonomy_name=config.taxonomy_name,
        labels=labels,
        thresholds=[0.5] * len(labels),
        max_length=config.max_length,
        max_windows=config.max_windows,
        window_overlap=config.window_overlap,
        base_model=base,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _encoder_source(
    config: TrainConfig,
    base_model: str | None,
    texts: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    labels: list[str],
    work_dir: Path,
    report: Progress,
) -> tuple[Path, Path, LinearHead | None, dict[str, Any], str, TrainConfig]:
    """The encoder this run uses: an earlier bundle's (frozen), or one fine-tuned here (cached in ``work_dir`` by
    everything that determines it, so re-running the head stage costs no second fine-tune)."""
    if config.frozen_encoder:
        source = _resolve(config.encoder)
        manifest = read_manifest(source)
        windows = {
            "max_length": manifest.max_length,
            "max_windows": manifest.max_windows,
            "window_overlap": manifest.window_overlap,
        }
        if any(getattr(config, k) != v for k, v in windows.items()):
            log.info("windows follow the reused encoder's bundle: %s", windows)
            config = TrainConfig(**{**asdict(config), **windows})
        info = {"encoder": "frozen", "from": config.encoder, "encoder_sha256": manifest.encoder_sha256}
        return source / ENCODER_FILE, source / TOKENIZER_FILE, None, info, manifest.base_model, config
    from .finetune import Task, finetune
    from .model import resolve_base_model

    base_path = resolve_base_model(base_model or config.base_model)
    # The packaged default is named by its folder; a folder someone chose, by its path.
    base_name = Path(base_path).name if base_model is None and not config.base_model else base_path
    held_out = {text for name in ("validation", "test", "newest") for text in texts[name]}
    joint, theirs = joint_tasks(config, held_out)
    # This run's training papers that a joint taxonomy holds out do not fine-tune the encoder either.
    kept = [i for i, text in enumerate(texts["train"]) if text not in theirs]
    own = {"train": [texts["train"][i] for i in kept], "validation": texts["validation"]}
    tasks = [Task(config.taxonomy_slug, own, {**targets, "train": targets["train"][kept]}), *joint]

    def data_key(task: Task) -> str:
        return _fingerprint(task.texts["train"], task.targets["train"].tolist(), task.texts["validation"])

    # Only what shapes the fine-tune keys its cache (a head or threshold setting must not start a new one).
    key_parts: list[Any] = [{name: getattr(config, name) for name in FINETUNE_FIELDS}, base_path, labels]
    key_parts.append(data_key(tasks[0]))
    if len(tasks) > 1:
        key_parts.append([(task.slug, task.width, task.weight, data_key(task)) for task in tasks[1:]])
    key = _fingerprint(*key_parts)
    cached = work_dir / f"finetune-{key}"
    if (cached / "info.json").is_file():
        log.info("reusing the encoder fine-tuned earlier with the same settings and data: %s", cached)
        head = np.load(cached / "head.npz")
        info = json.loads((cached / "info.json").read_text())
        return (
            cached / ENCODER_FILE,
            cached / TOKENIZER_FILE,
            LinearHead(head["weight"], head["bias"]),
            info,
            base_name,
            config,
        )
    papers = sum(len(task.texts["train"]) for task in tasks)
    seconds = config.epochs * papers / (CPU_FINETUNE_RATE * _cores())
    log.info("estimated time: %s to fine-tune the encoder first (much less on a GPU)", _minutes(seconds))
    tuned = finetune(config, base_path, tasks, cached, report)
    if tuned is None:  # a non-main process of a distributed run
        raise SystemExit(0)
    np.savez(cached / "head.npz", weight=tuned.head_weight, bias=tuned.head_bias)
    info = {"encoder": "fine-tuned", **tuned.info}
    (cached / "info.json").write_text(json.dumps(info))
    return (
        tuned.encoder_path,
        tuned.tokenizer_path,
        LinearHead(tuned.head_weight, tuned.head_bias),
        info,
        base_name,
        config,
    )


def joint_tasks(config: TrainConfig, held_out: set[str]) -> tuple[list[Task], set[str]]:
    """The taxonomies of ``joint_configs`` as fine-tuning tasks, and the texts they hold out. Each task has its
    config's own labels, train split (sampled by ``joint_sample_fraction``) and validation split, by its own split
    rule, so that a head trained later with that config on this encoder is measured on papers the encoder never
    trained on; the texts this run holds out (``held_out``) are dropped from them for the same reason, and the
    caller drops the returned ones (their validation, test and newest papers) from its own training papers."""
    from .finetune import Task

    tasks: list[Task] = []
    theirs: set[str] = set()
    for name in config.joint_configs:
        other = TrainConfig.load(_resolve(name))
        if other.taxonomy_slug == config.taxonomy_slug or other.taxonomy_slug in {t.slug for t in tasks}:
            raise ConfigError(f"joint config {name} repeats the taxonomy {other.taxonomy_slug!r}")
        splits, _ = load_dataset(other)
        try:
            labels, _ = choose_labels(splits["train"], other.min_label_count, other.max_labels)
        except DataError as exc:
            raise DataError(f"joint config {name}: {exc}") from None
        theirs |= {p.text for split in ("validation", "test", "newest") for p in splits[split]}
        chosen = {
            "train": [p for p in splits["train"] if in_sample(p.id, config.joint_sample_fraction)],
            "validation": splits["validation"],
        }
        chosen = {split: [p for p in items if p.text not in held_out] for split, items in chosen.items()}
        if not chosen["train"]:
            raise ConfigError(f"joint config {name}: no train papers (more data, or a larger joint_sample_fraction)")
        if not chosen["validation"]:
            raise ConfigError(f"joint config {name}: no validation papers (more data, or its validation_fraction)")
        log.info(
            "joint fine-tune with %s: %d labels, %d training and %d validation papers",
            other.taxonomy_slug,
            len(labels),
            len(chosen["train"]),
            len(chosen["validation"]),
        )
        tasks.append(
            Task(
                other.taxonomy_slug,
                {split: [p.text for p in items] for split, items in chosen.items()},
                {split: multi_hot(items, labels) for split, items in chosen.items()},
                config.joint_loss_weight,
            )
        )
    return tasks, theirs


def train(
    config: TrainConfig,
    out_dir: str | Path,
    corrections: list[Paper] | None = None,
    base_model: str | None = None,
    progress: Progress | None = None,
    label_map: LabelMap | None = None,
    work_dir: str | Path | None = None,
) -> Path:
    """Run one training and write the bundle to ``out_dir`` (atomically). Returns the bundle path."""
    report = progress or (lambda update: None)
    started = time.monotonic()
    work_dir = Path(work_dir) if work_dir else REPO_ROOT / "out" / "work"
    splits, data_summary = load_dataset(config, corrections, label_map)
    labels, dropped = choose_labels(splits["train"], config.min_label_count, config.max_labels)
    if dropped:
        log.info(
            "%d labels dropped, seen in fewer than min_label_count=%d training papers: %s",
            len(dropped),
            config.min_label_count,
            "; ".join(f"{label} ({count})" for label, count in dropped),
        )
    data_summary["labels_dropped"] = len(dropped)
    for name in ("validation", "test"):
        if not splits[name]:
            raise ConfigError(f"the {name} split is empty: use more data or a larger {name}_fraction")
    targets = {name: multi_hot(items, labels) for name, items in splits.items()}
    texts = {name: [p.text for p in items] for name, items in splits.items()}
    negatives = {name: np.asarray([not p.labels for p in items], dtype=bool) for name, items in splits.items()}
    log.info("%d labels; papers per split %s", len(labels), data_summary["splits"])
    # Abstracts already encoded with this encoder (the work dir's cache) make it shorter.
    encoding = sum(len(v) for v in splits.values()) * config.max_windows / (CPU_ENCODE_RATE * _cores())
    log.info(
        "estimated time: %s to read the abstracts and fit the head (less with cached readings)", _minutes(encoding)
    )
    report({"status": "running", "phase": "prepare", "stage": "preparing the encoder"})

    encoder_path, tokenizer_path, joint_head, encoder_info, base_name, config = _encoder_source(
        config, base_model, texts, targets, labels, work_dir, report
    )
    with tempfile.TemporaryDirectory(prefix="papertag-head-") as scratch:
        scratch = Path(scratch)
        provisional = _window_manifest(config, labels, base_name)
        report({"status": "running", "phase": "fit", "stage": "reading the abstracts with the encoder"})
        readings = read_abstracts(config, encoder_path, tokenizer_path, provisional, work_dir, texts)
        pooled = {
            name: np.stack([r.pooled for r in readings[name]]) if readings[name] else np.zeros((0, 1), dtype=np.float32)
            for name in SPLITS
        }
        report({"status": "running", "phase": "fit", "stage": "fitting the head and the lexical classifier"})
        design = choose_head(
            pooled,
            texts,
            targets,
            joint_head=joint_head,
            head_c=config.head_c,
            lexical=config.lexical,
            lexical_max_features=config.lexical_max_features,
            lexical_c=config.lexical_c,
        )
        head_path = build_head(
            scratch / "head.onnx",
            design.embedding_head,
            domain_references(pooled["train"], config.seed),
            design.lexical,
            design.lexical_head,
            design.encoder_weight,
        )
        fp32_head = head_path.with_suffix(".fp32.onnx")
        best_guess = config.best_guess == "on" or (
            config.best_guess == "auto" and not any(not p.labels for p in splits["train"])
        )
        candidate = write_bundle(scratch / "candidate", provisional, encoder_path, head_path, tokenizer_path)
        model = LoadedModel(candidate, threads=os.cpu_count() or 1)

        def outputs(name: str, served: LoadedModel = model) -> tuple[np.ndarray, np.ndarray]:
            logits, domain = served.head_outputs(texts[name], readings[name])
            return 1 / (1 + np.exp(-logits.astype(np.float64))), domain

        validation, validation_domain = outputs("validation")
        min_support = config.threshold_min_support or choose_min_support(validation, targets["validation"])
        support = min_support or len(validation) + 1
        guess_floor = 0.0
        if best_guess:
            thresholds, global_threshold, guess_floor = guessing_thresholds(
                validation, targets["validation"], support, config.max_empty_share
            )
        else:
            thresholds, global_threshold = tune_thresholds(validation, targets["validation"], support)
        domain_threshold = round(float(np.quantile(validation_domain, config.domain_quantile)), 4)
        manifest = _window_manifest(config, labels, base_name)
        manifest.thresholds = thresholds
        manifest.best_guess = best_guess
        manifest.guess_floor = guess_floor
        manifest.domain_threshold = domain_threshold
        manifest.training_data = data_summary
        decision: dict[str, Any] = {
            "best_guess": best_guess,
            "guess_floor": guess_floor,
            "domain_threshold": domain_threshold,
        }
        figures: dict[str, Any] = {}
        for name in ("validation", "test", "newest"):
            if texts[name]:
                probabilities, domain = outputs(name)
                figures[name] = metrics.product_report(
                    probabilities, targets[name], thresholds, domain=domain, negatives=negatives[name], **decision
                )
                reading = readings[name]
                figures[name]["encoder_truncated_share"] = round(float(np.mean([r.truncated for r in reading])), 4)
        test = outputs("test")[0]
        figures["test"].update(
            {
                k: v
                for k, v in metrics.full_report(test, targets["test"], thresholds, labels).items()
                if k in ("per_label", "macro_roc_auc")
            }
        )
        # int8 against fp32: encoder and head when the fp32 encoder is at hand (fine-tuned in this work dir),
        # else the head alone (a reused encoder was measured when it was made).
        fp32_encoder = encoder_path.with_name("encoder.fp32.onnx")
        scope = "encoder and head" if fp32_encoder.is_file() else "head"
        fp32_dir = write_bundle(
            scratch / "fp32",
            manifest,
            fp32_encoder if fp32_encoder.is_file() else encoder_path,
            fp32_head,
            tokenizer_path,
        )
        fp32_probabilities, _ = served_outputs(LoadedModel(fp32_dir, threads=os.cpu_count() or 1), texts["test"])
        # The gate's drift: the thresholded labels, what quantisation moves (best guesses near their floor would
        # add the noise of a few flips on a small test split).
        fp32_labels = metrics.summary(fp32_probabilities, targets["test"], thresholds)
        int8_labels = metrics.summary(test, targets["test"], thresholds)
        manifest.metrics = {
            **figures,
            "drift": {
                "scope": scope,
                "fp32_vs_int8_max_abs_probability": round(max_abs_difference(fp32_probabilities, test), 6),
                "fp32_vs_int8_mean_abs_probability": round(float(np.mean(np.abs(fp32_probabilities - test))), 6)
                if len(test)
                else 0.0,
                "micro_f1_fp32": fp32_labels["micro_f1"],
                "micro_f1_int8": int8_labels["micro_f1"],
                "micro_f1_delta": round(abs(fp32_labels["micro_f1"] - int8_labels["micro_f1"]), 4),
            },
            "training": {
                **encoder_info,
                "design": design.choices,
                "threshold_min_support": min_support,
                "global_threshold": global_threshold,
                "seconds": round(time.monotonic() - started),
                "config": asdict(config),
            },
        }
        if config.baseline:
            report({"status": "running", "phase": "fit", "stage": "fitting the TF-IDF baseline"})
            manifest.metrics["baseline"] = tfidf_baseline(texts, targets, negatives)
        bundle = write_bundle(out_dir, manifest, encoder_path, head_path, tokenizer_path)
    log.info("bundle written to %s in %.0f s", bundle, time.monotonic() - started)
    for line in figures_table(manifest.metrics):
        log.info(line)
    report(
        {
            "metrics": {
                k: figures["test"][k] for k in ("micro_f1", "macro_f1", "micro_precision", "micro_recall", "examples")
            }
        }
    )
    return bundle


def figures_table(figures: dict[str, Any]) -> list[str]:
    """The model's figures beside the baseline's on each reported split, as printed lines."""
    keys = ("micro_f1", "macro_f1", "empty_share", "hit_at_3", "negative_fp_rate")
    rows = [f"{'split':<8} {'':<9}" + "".join(f"{key:>18}" for key in keys)]
    for split in ("test", "newest"):
        for who, source in (("model", figures), ("baseline", figures.get("baseline", {}))):
            values = source.get(split)
            if values:
                cells = "".join(f"{'-' if values.get(k) is None else format(values[k], '.3f'):>18}" for k in keys)
                rows.append(f"{split:<8} {who:<9}{cells}")
    return rows
