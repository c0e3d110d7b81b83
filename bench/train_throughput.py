"""Training throughput of the trainer's model (abstracts/s), on CUDA when present, else the CPU.

Times real optimiser steps (forward, BCE loss, backward, AdamW) of the default base encoder on real
abstracts, at each sequence length asked for, after a warm-up. Prints one line per length.

    .venv/bin/python bench/train_throughput.py --lengths 128 256 --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.data import read_papers  # noqa: E402
from trainer.model import Tagger, resolve_base_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "pwc-tasks" / "papers.jsonl.gz"


def measure(length: int, batch_size: int, steps: int, device: torch.device, texts: list[str]) -> float:
    base = resolve_base_model("")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = Tagger(base, 194).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batches = [texts[i * batch_size : (i + 1) * batch_size] for i in range(steps + 2)]

    def step(batch: list[str]) -> None:
        encoded = tokenizer(batch, truncation=True, max_length=length, padding=True, return_tensors="pt").to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(encoded["input_ids"], encoded["attention_mask"])
        loss = loss_fn(logits.float(), torch.zeros_like(logits, dtype=torch.float32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up: allocator, kernels, thread pools
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = [p.text for p in read_papers(DATA)[: (args.steps + 2) * args.batch_size]]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {where}; torch {torch.__version__}; batch {args.batch_size}; {args.steps} timed steps")
    for length in args.lengths:
        rate = measure(length, args.batch_size, args.steps, device, texts)
        print(f"max_length {length}: {rate:.1f} abstracts/s")


if __name__ == "__main__":
    main()
