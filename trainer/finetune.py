"""Fine-tuning the shared encoder (torch): MiniLM + mean pooling + a linear head, trained end to end on the first
window of each abstract, then exported as ``encoder.onnx`` (int8) and the head's weights.

The encoder may learn several taxonomies at once (:class:`Task`): one output layer spans every taxonomy's labels and
each paper's loss counts only its own taxonomy's columns (at its taxonomy's weight), so papers of one taxonomy are
neither positives nor negatives for another's labels. The shared encoder then serves them all in one pass.

This is the step that needs a GPU to be quick; everything after it (heads, lexical part, fusion, thresholds) runs on
the frozen encoder in minutes on a CPU (:mod:`trainer.heads`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from webapp.quality.tuning import best_global_threshold

from .config import TrainConfig
from .export import PooledEncoder, export_encoder, max_abs_difference, quantize_int8
from .model import Tagger

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class FineTuned:
    """What fine-tuning leaves for the rest of the run: the int8 encoder, its tokenizer and the jointly trained
    head (weights over the pooled embedding)."""

    encoder_path: Path
    tokenizer_path: Path
    head_weight: np.ndarray  # [hidden, labels]
    head_bias: np.ndarray  # [labels]
    info: dict[str, Any]


@dataclass
class Task:
    """One taxonomy's share of a fine-tune: texts and multi-hot targets for its ``train`` and ``validation``
    splits, and the weight of its papers in the loss and in early stopping. The first task of a run is the one
    whose head comes back in :class:`FineTuned`."""

    slug: str
    texts: dict[str, list[str]]
    targets: dict[str, np.ndarray]
    weight: float = 1.0

    @property
    def width(self) -> int:
        return self.targets["train"].shape[1]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Encoded(torch.utils.data.Dataset):
    """Token ids per paper (unpadded), multi-hot targets over every task's labels and the weights of the columns
    the paper is scored on (its own task's, at its task's weight; 0 elsewhere); batches are padded by
    :func:`make_collate`."""

    def __init__(self, ids: list[list[int]], targets: np.ndarray, scored: np.ndarray) -> None:
        self.ids, self.targets, self.scored = ids, torch.from_numpy(targets), torch.from_numpy(scored)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        return self.ids[index], self.targets[index], self.scored[index]


def make_collate(pad_id: int) -> Callable:
    def collate(batch: list[tuple[list[int], torch.Tensor, torch.Tensor]]) -> Batch:
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids, mask, torch.stack([t for _, t, _ in batch]), torch.stack([s for _, _, s in batch])

    return collate


def stacked(tasks: list[Task], split: str, ids: list[list[list[int]]]) -> Encoded:
    """Every task's papers of ``split`` in one data set, targets placed in the task's columns of the joint output
    layer and only those columns scored (at the task's weight)."""
    total = sum(task.width for task in tasks)
    rows = sum(len(task.texts[split]) for task in tasks)
    targets = np.zeros((rows, total), dtype=np.float32)
    scored = np.zeros((rows, total), dtype=np.float32)
    row, column = 0, 0
    for task in tasks:
        count = len(task.texts[split])
        targets[row : row + count, column : column + task.width] = task.targets[split]
        scored[row : row + count, column : column + task.width] = task.weight
        row, column = row + count, column + task.width
    return Encoded([paper for group in ids for paper in group], targets, scored)


def positive_weights(dataset: Encoded, cap: float) -> np.ndarray:
    """BCE positive weight per label: negatives over positives among the papers scored on it, from 1 to ``cap``."""
    scored = dataset.scored.numpy() > 0
    positives = dataset.targets.numpy().sum(axis=0)
    negatives = scored.sum(axis=0) - positives
    return np.clip(negatives / np.maximum(positives, 1), 1.0, cap)


def masked_bce(
    logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """Mean BCE over the scored cells only, weighted by ``scored`` (with every cell scored at 1:
    ``BCEWithLogitsLoss(pos_weight)``)."""
    cells = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    return (cells * scored).sum() / scored.sum().clamp(min=1.0)


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
    for input_ids, mask, _, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(input_ids.to(device), mask.to(device))
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(outputs)


@torch.no_grad()
def encoder_parity(model: Tagger, onnx_path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest difference between torch's pooled vectors and the exported fp32 graph's on the same batch."""
    expected = PooledEncoder(model).eval()(input_ids, attention_mask).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    return round(max_abs_difference(expected, actual), 6)


def finetune(
    config: TrainConfig,
    base_path: str,
    tasks: list[Task],
    work_dir: Path,
    progress: Progress | None = None,
) -> FineTuned | None:
    """Fine-tune on every task's train split, early-stop on the tasks' validation micro-F1 (their mean, weighted
    by the tasks' weights), export the best epoch's encoder to ``work_dir`` with the first task's head. Returns
    None in the non-main processes of a distributed (torchrun) run."""
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
    n_labels = sum(task.width for task in tasks)
    edges = np.cumsum([0] + [task.width for task in tasks]).tolist()
    spans = [slice(start, end) for start, end in pairwise(edges)]

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    encoded = {
        name: [
            tokenizer(task.texts[name], truncation=True, max_length=config.max_length)["input_ids"] for task in tasks
        ]
        for name in ("train", "validation")
    }
    collate = make_collate(tokenizer.pad_token_id or 0)
    batch_size = config.gpu_batch_size if device.type == "cuda" else config.batch_size
    train_set = stacked(tasks, "train", encoded["train"])
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
    validation_loaders = [
        DataLoader(stacked([task], "validation", [ids]), batch_size=config.eval_batch_size, collate_fn=collate)
        for task, ids in zip(tasks, encoded["validation"], strict=True)
    ]

    model = Tagger(base_path, n_labels, config.encoder_layers).to(device)
    trainable = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        trainable = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    pos_weight = torch.tensor(positive_weights(train_set, config.max_pos_weight), dtype=torch.float32, device=device)
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
        return {"status": "running", "phase": "epoch", "stage": "fine-tuning the encoder", **fields, **extra}

    best: dict[str, Any] = {"micro_f1": -1.0, "epoch": 0, "state": None, "per_task": []}
    step, epoch, running = 0, 0, 0.0
    for epoch in range(1, config.epochs + 1):
        trainable.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not main_process, unit="batch")
        loss_sum, batches = 0.0, 0
        for input_ids, mask, batch_targets, scored in bar:
            with torch.autocast(
                device.type, dtype=torch.bfloat16 if use_bf16 else torch.float16, enabled=device.type == "cuda"
            ):
                logits, _ = trainable(input_ids.to(device), mask.to(device))
            loss = masked_bce(logits.float(), batch_targets.to(device), scored.to(device), pos_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            running = loss_sum / batches
            bar.set_postfix(loss=f"{running:.4f}")
            # From the first step on (an estimate exists then, so the page shows one), then every 20 steps.
            if main_process and (step == 1 or step % 20 == 0):
                elapsed = time.monotonic() - started
                report(progress_of(epoch, step, running, eta_seconds=round(elapsed / step * (total_steps - step))))
        per_task = []
        for task, loader, span in zip(tasks, validation_loaders, spans, strict=True):
            validation = predict_probabilities(model, loader, device)[:, span]
            threshold, task_f1 = best_global_threshold(validation, task.targets["validation"])
            log.info("epoch %d: %s validation micro-F1 %.4f at threshold %.3f", epoch, task.slug, task_f1, threshold)
            per_task.append(task_f1)
        micro_f1 = float(np.average(per_task, weights=[task.weight for task in tasks]))
        log.info(
            "epoch %d: loss %.4f, validation micro-F1 %.4f (weighted mean over taxonomies)", epoch, running, micro_f1
        )
        report(progress_of(epoch, step, running, validation_micro_f1=round(micro_f1, 4)))
        if micro_f1 > best["micro_f1"]:
            best = {
                "micro_f1": micro_f1,
                "epoch": epoch,
                "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                "per_task": per_task,
            }
        elif epoch - best["epoch"] >= config.patience:
            log.info("early stop: no validation gain for %d epochs (best epoch %d)", config.patience, best["epoch"])
            break
    if distributed:
        torch.distributed.destroy_process_group()
    if not main_process:
        return None

    report({"status": "running", "phase": "export", "stage": "exporting the encoder to ONNX and int8"})
    model.load_state_dict(best["state"])
    model = model.to("cpu").float().eval()
    work_dir.mkdir(parents=True, exist_ok=True)
    sample = tokenizer(
        tasks[0].texts["validation"][:2],
        truncation=True,
        max_length=config.max_length,
        padding=True,
        return_tensors="pt",
    )
    fp32_path = export_encoder(model, sample["input_ids"], sample["attention_mask"], work_dir / "encoder.fp32.onnx")
    encoder_path = quantize_int8(fp32_path, work_dir / "encoder.onnx")
    parity = encoder_parity(model, fp32_path, sample["input_ids"], sample["attention_mask"])
    tokenizer_path = work_dir / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(tokenizer_path))
    weight = model.head.weight.detach().numpy()[spans[0]].T.astype(np.float32)
    bias = model.head.bias.detach().numpy()[spans[0]].astype(np.float32)
    info = {
        "best_epoch": best["epoch"],
        "epochs_run": epoch,
        "validation_micro_f1_first_window": round(float(best["per_task"][0]), 4),
        "torch_vs_onnx_fp32_max_abs_pooled": parity,
        "device": str(device),
        "processes": world_size,
        "seconds": round(time.monotonic() - started),
    }
    if len(tasks) > 1:
        info["taxonomies"] = [
            {
                "slug": task.slug,
                "labels": task.width,
                "train_papers": len(task.texts["train"]),
                "loss_weight": task.weight,
                "validation_micro_f1_first_window": round(float(f1), 4),
            }
            for task, f1 in zip(tasks, best["per_task"], strict=True)
        ]
    return FineTuned(encoder_path, tokenizer_path, weight, bias, info)
