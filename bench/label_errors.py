"""How many injected label errors the likely-label-errors queue catches (issue 12 point 6).

A copy of the shipped research-task data gets known flips (5% of the papers, seeded: half lose one of their labels,
half have one swapped for another label of the taxonomy); ``trainer.label_issues`` ranks the copy; the first 100
papers of three orders are compared:

- cleanlab: the label-issues queue (cleanlab's label quality over out-of-fold scores, lowest first);
- uncertainty: today's review-queue order, the served model's margin (smallest |score - threshold| first);
- random: a seeded shuffle.

Flips only touch labels the model knows (those kept by ``min_label_count``): a flip of a label no model has is
invisible to every order. The shipped data has errors of its own, so "precision" (flipped papers among the first
100) is a lower bound. Seed 0 chose the queue's design (cleanlab's softmin aggregator, the lexical half), so the
reported seeds start at 1. Readings come from the work dir's cache (``out/work``; the first run encodes the 8,044
abstracts, ~10 min on 2 cores).

    .venv/bin/python bench/label_errors.py [--seeds 3] [--first-seed 1] [--share 0.05] [--top 100]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Paper, choose_labels  # noqa: E402
from trainer.label_issues import quality_order, score_dataset  # noqa: E402
from trainer.train import SPLITS, _window_manifest, load_dataset, read_abstracts  # noqa: E402
from webapp.serving.bundle import ENCODER_FILE, TOKENIZER_FILE, read_manifest  # noqa: E402
from webapp.serving.inference import LoadedModel  # noqa: E402

CONFIG = REPO_ROOT / "trainer" / "configs" / "research-tasks-heads.json"
BUNDLE = REPO_ROOT / "models" / "research-tasks"


def inject_flips(papers: list[Paper], labels: list[str], share: float, seed: int) -> tuple[list[Paper], set[str]]:
    """A copy of ``papers`` with ``share`` of them flipped (one kept label removed, or swapped for another kept
    label), and the ids flipped."""
    rng = np.random.default_rng(seed)
    known = set(labels)
    candidates = [i for i, p in enumerate(papers) if known & set(p.labels)]
    chosen = rng.choice(candidates, size=round(share * len(papers)), replace=False)
    flipped = list(papers)
    for n, i in enumerate(sorted(chosen)):
        paper = papers[i]
        present = sorted(known & set(paper.labels))
        victim = present[rng.integers(len(present))]
        kept = [label for label in paper.labels if label != victim]
        if n % 2:  # swap for a label the paper does not have
            absent = [label for label in labels if label not in paper.labels]
            kept.append(absent[rng.integers(len(absent))])
        flipped[i] = Paper(paper.id, paper.title, paper.abstract, sorted(kept))
    return flipped, {papers[i].id for i in chosen}


def write_copy(papers: list[Paper], path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for p in papers:
            handle.write(json.dumps({"id": p.id, "title": p.title, "abstract": p.abstract, "labels": p.labels}) + "\n")
    return path


def served_margins(config: TrainConfig, papers: list[Paper], labels: list[str]) -> np.ndarray:
    """The shipped model's margin for each paper: what today's review queue sorts by (smallest first)."""
    model = LoadedModel(BUNDLE, threads=2)
    shipped = read_manifest(BUNDLE)
    windows = {k: getattr(shipped, k) for k in ("max_length", "max_windows", "window_overlap")}
    config = TrainConfig(**{**asdict(config), **windows})
    manifest = _window_manifest(config, labels, "")
    texts = {"all": [p.text for p in papers]}
    readings = read_abstracts(
        config, BUNDLE / ENCODER_FILE, BUNDLE / TOKENIZER_FILE, manifest, REPO_ROOT / "out" / "work", texts
    )
    logits, _ = model.head_outputs(texts["all"], readings["all"])
    probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return np.min(np.abs(probabilities - np.asarray(model.thresholds)), axis=1)


def caught(order: np.ndarray, ids: list[str], flipped: set[str], top: int) -> int:
    return sum(ids[i] in flipped for i in order[:top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="flip injections, each scored afresh")
    parser.add_argument(
        "--first-seed", type=int, default=1, help="seed of the first injection (0 chose the design: not reported)"
    )
    parser.add_argument("--share", type=float, default=0.05, help="share of papers flipped")
    parser.add_argument("--top", type=int, default=100, help="queue items a curator reviews")
    args = parser.parse_args()
    base = TrainConfig.load(CONFIG)
    splits, _ = load_dataset(base)
    papers = [p for name in SPLITS for p in splits[name]]
    labels, _ = choose_labels(splits["train"], base.min_label_count, base.max_labels)
    totals = {"cleanlab": [], "uncertainty": [], "random": []}
    print(
        f"command: .venv/bin/python bench/label_errors.py --seeds {args.seeds} --first-seed {args.first_seed} "
        f"--share {args.share} --top {args.top}"
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        flipped_papers, flipped = inject_flips(papers, labels, args.share, seed)
        with tempfile.TemporaryDirectory() as scratch:
            data = write_copy(flipped_papers, Path(scratch) / "papers.jsonl.gz")
            # The flipped copy is the whole data set (aliases already applied, no splits moved: same ids).
            config = TrainConfig(**{**asdict(base), "data": [str(data)], "label_aliases_file": ""})
            scored = score_dataset(config)
        ids = [p.id for p in scored.papers]
        _, cleanlab_order, flagged = quality_order(scored)
        margins = served_margins(config, scored.papers, scored.labels)
        orders = {
            "cleanlab": cleanlab_order,
            "uncertainty": np.argsort(margins, kind="stable"),
            "random": np.random.default_rng(1000 + seed).permutation(len(ids)),
        }
        line = []
        for name, order in orders.items():
            hits = caught(order, ids, flipped, args.top)
            totals[name].append(hits)
            line.append(f"{name} {hits}")
        flagged_hits = sum(ids[i] in flipped for i in np.flatnonzero(flagged))
        print(
            f"seed {seed}: {len(flipped)} of {len(ids)} papers flipped; flipped papers in the first {args.top}: "
            + ", ".join(line)
            + f"; cleanlab flags {int(flagged.sum())} papers, {flagged_hits} of them flipped"
        )
    flips = round(args.share * len(papers))
    print(
        f"\nmean over seeds {seeds.start}-{seeds.stop - 1}, first {args.top} of the queue "
        f"({flips} flipped papers of {len(papers)}):"
    )
    random_mean = float(np.mean(totals["random"]))
    for name, hits in totals.items():
        mean = float(np.mean(hits))
        print(
            f"  {name:<12} {mean:6.1f} flipped papers caught = {mean / args.top:6.1%} of the {args.top} reviewed, "
            f"{mean / flips:6.1%} of all flips, {mean / max(random_mean, 1e-9):5.1f}x random"
        )


if __name__ == "__main__":
    main()
