"""A brought labelled set, simulated: about 1,500 long abstracts, 10 labels, some with none of them, in another
set's field names, trained the way README's "Bringing another labelled set" says, and scored beside TF-IDF.

The set is built from the shipped arXiv data (the longest abstracts; 10 categories chosen so that about one paper
in seven has none of them: true negatives), written as ``pmid``/``text``/``hallmarks`` rows without titles, like a
biomedical set. The head is trained on the frozen shared encoder of ``--encoder`` (a format-2 bundle); the encoder
never saw these labels. Prints the model's and the baseline's figures on the same test rows, and the share of
label-free abstracts given a label; then what a "none of these" cut would cost: answering only when the top
probability reaches a cut chosen on the validation split for at most ``--max-label-free-fp`` of its label-free
abstracts given a label (the most micro-F1 among such cuts), scored on the test rows.

    python bench/byo.py [--encoder models/research-tasks] [--papers 1500] [--out out/byo] [--max-label-free-fp 0.25]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import Paper, multi_hot  # noqa: E402
from trainer.evaluate import served_outputs  # noqa: E402
from trainer.metrics import decisions  # noqa: E402
from trainer.train import figures_table, load_dataset, train  # noqa: E402
from webapp.quality.tuning import f1_score  # noqa: E402
from webapp.serving.bundle import read_manifest  # noqa: E402
from webapp.serving.inference import LoadedModel  # noqa: E402

ARXIV = REPO / "data" / "arxiv-categories" / "papers.jsonl.gz"
# Broad categories that tag most papers of the set are left out, as a set about a few themes would.
LEFT_OUT = ("cs.AI", "cs.LG")


def build_set(papers: int, labels: int, out: Path) -> tuple[Path, list[str], float]:
    """The longest ``papers`` abstracts, labelled with ``labels`` frequent categories (all others dropped)."""
    rows = [json.loads(line) for line in gzip.open(ARXIV, "rt", encoding="utf-8")]
    rows.sort(key=lambda row: (-len(row["abstract"]), row["id"]))
    chosen_rows = rows[:papers]
    counts = Counter(label for row in chosen_rows for label in row["labels"] if label not in LEFT_OUT)
    kept = sorted(label for label, _ in counts.most_common(labels))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "papers.jsonl"
    label_free = 0
    with open(path, "w", encoding="utf-8") as handle:
        for number, row in enumerate(chosen_rows):
            hallmarks = sorted(set(row["labels"]) & set(kept))
            label_free += not hallmarks
            handle.write(json.dumps({"pmid": 30_000_000 + number, "text": row["abstract"], "hallmarks": hallmarks}))
            handle.write("\n")
    return path, kept, label_free / len(chosen_rows)


def shown_and_truth(model: LoadedModel, papers: list[Paper]) -> tuple[np.ndarray, ...]:
    """What the bundle shows for ``papers``, their gold labels, their top probabilities and which are label-free."""
    probabilities, domain = served_outputs(model, [p.text for p in papers])
    manifest = model.manifest
    off_domain = domain < manifest.domain_threshold if manifest.domain_threshold is not None else None
    shown = decisions(
        probabilities,
        manifest.thresholds,
        best_guess=manifest.best_guess,
        guess_floor=manifest.guess_floor,
        off_domain=off_domain,
    )
    label_free = np.asarray([not p.labels for p in papers], dtype=bool)
    return shown.astype(bool), multi_hot(papers, manifest.labels) > 0, probabilities.max(axis=1), label_free


def cut_figures(
    shown: np.ndarray, truth: np.ndarray, top: np.ndarray, label_free: np.ndarray, cut: float
) -> tuple[float, float]:
    """Micro-F1 and the label-free abstracts given a label when only papers whose top probability reaches ``cut``
    are answered."""
    kept = shown & (top >= cut)[:, None]
    tp, fp, fn = (kept & truth).sum(), (kept & ~truth).sum(), (~kept & truth).sum()
    micro = float(f1_score(np.array(tp), np.array(fp), np.array(fn)))
    return micro, float(kept[label_free].any(axis=1).mean()) if label_free.any() else 0.0


def none_of_these_cut(
    bundle: Path, config: TrainConfig, max_fp: float
) -> tuple[float, tuple[float, float], tuple[float, float]] | None:
    """The cut chosen on validation (the most micro-F1 with at most ``max_fp`` of its label-free abstracts given a
    label), with its validation and test figures; None when no cut meets it."""
    splits, _ = load_dataset(config)
    model = LoadedModel(bundle, threads=os.cpu_count() or 1)
    validation = shown_and_truth(model, splits["validation"])
    test = shown_and_truth(model, splits["test"])
    best = None
    for cut in np.unique(np.round(validation[2], 4)):
        micro, fp = cut_figures(*validation, float(cut))
        if fp <= max_fp and (best is None or micro > best[1][0]):
            best = (float(cut), (micro, fp))
    if best is None:
        return None
    return best[0], best[1], cut_figures(*test, best[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="models/research-tasks", help="format-2 bundle whose encoder is reused")
    parser.add_argument("--papers", type=int, default=1500, help="abstracts in the simulated set")
    parser.add_argument("--labels", type=int, default=10, help="labels of the simulated set")
    parser.add_argument("--out", default="out/byo", help="where the set, the config and the bundle go")
    parser.add_argument("--work-dir", default="out/work", help="the trainer's cache")
    parser.add_argument(
        "--max-label-free-fp",
        type=float,
        default=0.25,
        help="share of label-free validation abstracts a 'none of these' cut may still give a label (issue 10: 0.25)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    data, labels, label_free = build_set(args.papers, args.labels, out)
    print(f"set: {args.papers} abstracts, labels {labels}, {label_free:.1%} with none of them", flush=True)
    config = TrainConfig.from_dict(
        {
            "taxonomy_slug": "byo-simulated",
            "taxonomy_name": "Brought set (simulated)",
            "data": [str(data.resolve())],
            "fields": {"id": "pmid", "title": "", "abstract": "text", "labels": "hallmarks"},
            "encoder": args.encoder,
            "min_label_count": 5,
            "test_fraction": 0.2,
            "validation_fraction": 0.2,
        }
    )
    (out / "config.json").write_text(json.dumps(config.__dict__, indent=2), encoding="utf-8")
    load = os.getloadavg()[0]
    started = time.monotonic()
    bundle = train(config, out / "bundle", work_dir=args.work_dir)
    seconds = time.monotonic() - started
    metrics = read_manifest(bundle).metrics
    mine, theirs = metrics["test"], metrics["baseline"]["test"]
    for line in figures_table(metrics):
        print(line)
    print(
        f"micro-F1 minus TF-IDF's on the same {mine['examples']} test rows: "
        f"{mine['micro_f1'] - theirs['micro_f1']:+.3f}"
    )
    print(
        f"label-free test abstracts given a label: model {mine['negative_fp_rate']:.1%}, "
        f"TF-IDF {theirs['negative_fp_rate']:.1%} ({mine['negatives']} abstracts)"
    )
    print(
        f"abstracts the encoder's windows did not cover to the end: {mine['encoder_truncated_share']:.1%} "
        "(the lexical part reads all of each)"
    )
    print(f"trained in {seconds:.0f} s; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    chosen = none_of_these_cut(bundle, config, args.max_label_free_fp)
    if chosen is None:
        print(f"no 'none of these' cut keeps label-free validation abstracts given a label <= {args.max_label_free_fp}")
    else:
        cut, (valid_micro, valid_fp), (test_micro, test_fp) = chosen
        print(
            f"a 'none of these' cut (answer only when the top probability reaches {cut:.3f}, chosen on validation: "
            f"micro-F1 {valid_micro:.3f}, label-free given a label {valid_fp:.1%}): on the test rows micro-F1 "
            f"{test_micro:.3f} ({test_micro - theirs['micro_f1']:+.3f} against TF-IDF), label-free given a label "
            f"{test_fp:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
