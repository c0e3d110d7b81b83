"""The training run: data -> fine-tuned tagger -> thresholds -> ONNX int8 bundle with honest metrics."""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from webapp.bundle import Manifest, write_bundle
from webapp.inference import LoadedModel
from webapp.surgery import LabelMap
from webapp.tuning import best_global_threshold, tune_thresholds

from . import metrics
from .baseline import tfidf_baseline
from .config import TrainConfig
from .data import (
    Paper,
    apply_aliases,
    choose_labels,
    in_sample,
    merge_corrections,
    multi_hot,
    read_papers,
    relabel,
    split_of,
)
from .export import export_fp32, max_abs_difference, quantize_int8
from .model import Tagger, resolve_base_model
from .thresholds import choose_min_support

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
REPO_ROOT = Path(__file__).resolve().parent.parent


def load_dataset(
    config: TrainConfig, corrections: list[Paper] | None = None, label_map: LabelMap | None = None
) -> tuple[dict[str, list[Paper]], dict]:
    """Base files plus corrections, relabelled by the site's label changes, split deterministically; also a
    summary for bundle.json."""
    papers: list[Paper] = []
    for name in config.data:
        path = Path(name) if Path(name).is_absolute() else REPO_ROOT / name
        papers.extend(read_papers(path))
    papers = list({p.id: p for p in papers}.values())
    papers = [p for p in papers if in_sample(p.id, config.sample_fraction)]
    if config.max_examples:
        papers = papers[: config.max_examples]
    papers, merged = merge_corrections(papers, corrections or [])
    papers = apply_aliases(papers, config.label_aliases)
    papers = relabel(papers, label_map or LabelMap())
    splits: dict[str, list[Paper]] = {"train": [], "validation": [], "test": []}
    for paper in papers:
        splits[split_of(paper.id, config.test_fraction, config.validation_fraction)].append(paper)
    summary = {
        "files": config.data,
        "papers": len(papers),
        "corrections": len(corrections or []),
        "corrections_overriding": merged["overridden"],
        "corrections_added": merged["added"],
        "label_changes": [rule.id for rule in (label_map or LabelMap()).rules],
        "splits": {name: len(items) for name, items in splits.items()},
        "split_rule": f"sha256(id) bucket: test < {config.test_fraction}, "
        f"validation < {config.test_fraction + config.validation_fraction}",
    }
    return splits, summary


def test_split(
    config: TrainConfig, corrections: list[Paper] | None = None, label_map: LabelMap | None = None
) -> list[Paper]:
    """The frozen test papers of this config (with corrections and label changes applied), for the promotion
    gate."""
    splits, _ = load_dataset(config, corrections, label_map)
    return splits["test"]


class Encoded(torch.utils.data.Dataset):
    """Token ids per paper (unpadded) and multi-hot targets; batches are padded by :func:`collate`."""

    def __init__(self, ids: list[list[int]], targets: np.ndarray) -> None:
        self.ids, self.targets = ids, torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], torch.Tensor]:
        return self.ids[index], self.targets[index]


def make_collate(pad_id: int) -> Callable:
    def collate(batch: list[tuple[list[int], torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids, mask, torch.stack([t for _, t in batch])

    return collate


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config asks for device 'cuda' but no CUDA GPU is available")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@torch.no_grad()
def predict_probabilities(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    outputs = []
    for input_ids, mask, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(input_ids.to(device), mask.to(device))
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(outputs)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    corrections: list[Paper] | None = None,
    base_model: str | None = None,
    progress: Progress | None = None,
    label_map: LabelMap | None = None,
) -> Path:
    """Run one training and write the bundle to ``out_dir`` (atomically). Returns the bundle path."""
    report = progress or (lambda update: None)
    started = time.monotonic()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    distributed = world_size > 1
    device = pick_device(config)
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    main_process = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    set_seed(config.seed)
    base_path = resolve_base_model(base_model or config.base_model)

    splits, data_summary = load_dataset(config, corrections, label_map)
    labels = choose_labels(splits["train"], config.min_label_count, config.max_labels)
    targets = {name: multi_hot(items, labels) for name, items in splits.items()}
    texts = {name: [p.text for p in items] for name, items in splits.items()}
    for name in ("validation", "test"):
        if not splits[name]:
            raise ValueError(f"the {name} split is empty: use more data or a larger {name}_fraction")
    log.info("%d labels; papers per split %s; device %s", len(labels), data_summary["splits"], device)

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    encoded = {
        name: tokenizer(values, truncation=True, max_length=config.max_length)["input_ids"]
        for name, values in texts.items()
    }
    collate = make_collate(tokenizer.pad_token_id or 0)
    batch_size = config.gpu_batch_size if device.type == "cuda" else config.batch_size
    train_set = Encoded(encoded["train"], targets["train"])
    sampler = DistributedSampler(train_set, seed=config.seed) if distributed else None
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collate,
        generator=generator,
    )
    eval_loaders = {
        name: DataLoader(Encoded(encoded[name], targets[name]), batch_size=config.eval_batch_size, collate_fn=collate)
        for name in ("validation", "test")
    }

    model = Tagger(base_path, len(labels), config.encoder_layers).to(device)
    trainable = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        trainable = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    positives = targets["train"].sum(axis=0)
    pos_weight = np.clip((len(targets["train"]) - positives) / np.maximum(positives, 1), 1.0, config.max_pos_weight)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32, device=device))
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": config.learning_rate},
            {"params": head_params, "lr": config.head_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    total_steps = config.epochs * len(train_loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def progress_of(epoch: int, step: int, loss: float, **extra: float) -> dict[str, Any]:
        """One training-run progress update (the site shows it live)."""
        fields = {"epoch": epoch, "step": step, "total_steps": total_steps, "loss": round(loss, 5)}
        return {"status": "running", **fields, **extra}

    best = {"micro_f1": -1.0, "epoch": 0, "state": None}
    step = 0
    for epoch in range(1, config.epochs + 1):
        trainable.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not main_process, unit="batch")
        loss_sum, batches = 0.0, 0
        for input_ids, mask, batch_targets in bar:
            with torch.autocast(
                device.type, dtype=torch.bfloat16 if use_bf16 else torch.float16, enabled=device.type == "cuda"
            ):
                logits, _ = trainable(input_ids.to(device), mask.to(device))
            loss = loss_fn(logits.float(), batch_targets.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            running = loss_sum / batches
            bar.set_postfix(loss=f"{running:.4f}")
            if main_process and step % 20 == 0:
                elapsed = time.monotonic() - started
                report(progress_of(epoch, step, running, eta_seconds=round(elapsed / step * (total_steps - step))))
        validation = predict_probabilities(model, eval_loaders["validation"], device)
        threshold, micro_f1 = best_global_threshold(validation, targets["validation"])
        log.info("epoch %d: loss %.4f, validation micro-F1 %.4f at threshold %.3f", epoch, running, micro_f1, threshold)
        report(progress_of(epoch, step, running, validation_micro_f1=round(micro_f1, 4)))
        if micro_f1 > best["micro_f1"]:
            best = {
                "micro_f1": micro_f1,
                "epoch": epoch,
                "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            }
        elif epoch - best["epoch"] >= config.patience:
            log.info("early stop: no validation gain for %d epochs (best epoch %d)", config.patience, best["epoch"])
            break
    if distributed:
        torch.distributed.destroy_process_group()
    if not main_process:
        return Path(out_dir)

    model.load_state_dict(best["state"])
    model = model.to("cpu").float().eval()
    cpu = torch.device("cpu")
    validation = predict_probabilities(model, eval_loaders["validation"], cpu)
    min_support = config.threshold_min_support or choose_min_support(validation, targets["validation"])
    # 0 means one global threshold: no label has more positives than the whole split.
    thresholds, global_threshold = tune_thresholds(
        validation, targets["validation"], min_support or len(targets["validation"]) + 1
    )
    test_torch = predict_probabilities(model, eval_loaders["test"], cpu)

    with tempfile.TemporaryDirectory(prefix="papertag-export-") as scratch:
        scratch = Path(scratch)
        sample_ids, sample_mask, _ = next(iter(eval_loaders["test"]))
        fp32_path = export_fp32(model, sample_ids[:2], sample_mask[:2], scratch / "model.fp32.onnx")
        int8_path = quantize_int8(fp32_path, scratch / "model.onnx")
        tokenizer_path = scratch / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_path))
        manifest = Manifest(
            taxonomy_slug=config.taxonomy_slug,
            taxonomy_name=config.taxonomy_name,
            labels=labels,
            thresholds=thresholds,
            max_length=config.max_length,
            base_model=Path(base_path).name if base_model is None and not config.base_model else base_path,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            training_data=data_summary,
            metrics={},
        )
        # Measure both ONNX graphs through the server's own inference code: the round trip of the contract.
        fp32_dir = write_bundle(scratch / "fp32", manifest, fp32_path, tokenizer_path)
        int8_dir = write_bundle(scratch / "int8", manifest, int8_path, tokenizer_path)
        test_fp32 = 1 / (1 + np.exp(-LoadedModel(fp32_dir, threads=os.cpu_count() or 1).logits(texts["test"])))
        test_int8 = 1 / (1 + np.exp(-LoadedModel(int8_dir, threads=os.cpu_count() or 1).logits(texts["test"])))
        fp32_summary = metrics.summary(test_fp32, targets["test"], thresholds)
        int8_report = metrics.full_report(test_int8, targets["test"], thresholds, labels)
        manifest.metrics = {
            "test": int8_report,
            "validation": metrics.summary(validation, targets["validation"], thresholds),
            "drift": {
                "torch_vs_onnx_fp32_max_abs_probability": round(max_abs_difference(test_torch, test_fp32), 6),
                "fp32_vs_int8_max_abs_probability": round(max_abs_difference(test_fp32, test_int8), 6),
                "fp32_vs_int8_mean_abs_probability": round(float(np.mean(np.abs(test_fp32 - test_int8))), 6),
                "micro_f1_fp32": fp32_summary["micro_f1"],
                "micro_f1_int8": int8_report["micro_f1"],
                "micro_f1_delta": round(abs(fp32_summary["micro_f1"] - int8_report["micro_f1"]), 4),
            },
            "training": {
                "best_epoch": best["epoch"],
                "epochs_run": epoch,
                "device": str(device),
                "processes": world_size,
                "seconds": round(time.monotonic() - started),
                "global_threshold": global_threshold,
                "threshold_min_support": min_support,
                "config": asdict(config),
            },
        }
        if config.baseline:
            manifest.metrics["baseline"] = tfidf_baseline(
                texts["train"],
                targets["train"],
                texts["validation"],
                targets["validation"],
                texts["test"],
                targets["test"],
            )
        bundle = write_bundle(out_dir, manifest, int8_path, tokenizer_path)
    log.info(
        "bundle written to %s: test micro-F1 %.4f (int8), macro-F1 %.4f",
        bundle,
        int8_report["micro_f1"],
        int8_report["macro_f1"],
    )
    report({"metrics": metrics.summary(test_int8, targets["test"], thresholds)})
    return bundle
