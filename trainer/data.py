"""Labelled abstracts: reading JSONL/CSV, merging corrections, label filtering, splits, multi-hot targets."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from webapp.bundle import compose_text
from webapp.surgery import LabelMap

LABEL_SEPARATORS = ("|", ";")


class DataError(ValueError):
    """Unusable training data; the message names the file and the problem."""


@dataclass
class Paper:
    id: str
    title: str
    abstract: str
    labels: list[str]

    @property
    def text(self) -> str:
        return compose_text(self.title, self.abstract)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _paper_from(record: dict[str, Any], where: str) -> Paper:
    abstract = record.get("abstract")
    if not isinstance(abstract, str) or not abstract.strip():
        raise DataError(f"{where}: no abstract text")
    labels = record.get("labels")
    if isinstance(labels, str):
        separator = next((s for s in LABEL_SEPARATORS if s in labels), None)
        labels = labels.split(separator) if separator else [labels]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise DataError(f"{where}: labels must be a list of strings")
    labels = sorted({label.strip() for label in labels if label.strip()})
    if not labels:
        raise DataError(f"{where}: no labels")
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise DataError(f"{where}: title must be a string")
    paper_id = str(record.get("id") or "") or text_key(title, abstract)
    return Paper(id=paper_id, title=title.strip(), abstract=abstract.strip(), labels=labels)


def read_papers(path: str | Path) -> list[Paper]:
    """Read a JSONL or CSV file (optionally gzip'd) of ``id, title, abstract, labels`` rows.

    CSV labels are separated by ``|`` or ``;``. Any row without text or labels is an error that names
    the row: silently dropping rows would hide a broken export.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    is_csv = ".csv" in path.suffixes
    papers: list[Paper] = []
    try:
        with _open_text(path) as handle:
            if is_csv:
                reader = csv.DictReader(handle)
                fieldnames = {name.strip().lower() for name in reader.fieldnames or []}
                if not {"abstract", "labels"} <= fieldnames:
                    raise DataError(f"{path}: CSV needs 'abstract' and 'labels' columns, found {sorted(fieldnames)}")
                for number, row in enumerate(reader, start=2):
                    record = {key.strip().lower(): value for key, value in row.items() if key}
                    papers.append(_paper_from(record, f"{path} row {number}"))
            else:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {number}: not JSON ({exc.msg})") from exc
                    if not isinstance(record, dict):
                        raise DataError(f"{path} line {number}: not a JSON object")
                    papers.append(_paper_from(record, f"{path} line {number}"))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    if not papers:
        raise DataError(f"data file {path} holds no papers")
    return papers


def text_key(title: str | None, abstract: str) -> str:
    """Identity of a paper by its text, so a correction finds the base paper it overrides."""
    normalised = " ".join(compose_text(title, abstract).lower().split())
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def merge_corrections(papers: list[Paper], corrections: Iterable[Paper]) -> tuple[list[Paper], dict[str, int]]:
    """Corrections override the labels of the same paper (same id or same text); new ones are added."""
    by_id = {p.id: i for i, p in enumerate(papers)}
    by_text = {text_key(p.title, p.abstract): i for i, p in enumerate(papers)}
    merged = list(papers)
    counts = {"overridden": 0, "added": 0}
    for correction in corrections:
        index = by_id.get(correction.id, by_text.get(text_key(correction.title, correction.abstract)))
        if index is None:
            by_text[text_key(correction.title, correction.abstract)] = len(merged)
            merged.append(correction)
            counts["added"] += 1
        else:
            merged[index] = Paper(merged[index].id, merged[index].title, merged[index].abstract, correction.labels)
            counts["overridden"] += 1
    return merged, counts


def _bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def in_sample(paper_id: str, fraction: float) -> bool:
    """Whether a paper belongs to the deterministic ``fraction`` sample (salted: independent of its split)."""
    return fraction >= 1 or _bucket(f"sample:{paper_id}") < fraction


def split_of(paper_id: str, test_fraction: float, validation_fraction: float) -> str:
    """Deterministic split by a hash of the id: a paper never moves between splits as data grows."""
    bucket = _bucket(paper_id)
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def apply_aliases(papers: list[Paper], aliases: dict[str, str]) -> list[Paper]:
    if not aliases:
        return papers
    return [Paper(p.id, p.title, p.abstract, sorted({aliases.get(x, x) for x in p.labels})) for p in papers]


def relabel(papers: list[Paper], label_map: LabelMap) -> list[Paper]:
    """The site's label changes (renames, merges, keyword splits) applied to every paper, base data included, by
    the same rule the site reads its stored labels with."""
    if not label_map:
        return papers
    return [Paper(p.id, p.title, p.abstract, label_map.map_labels(p.labels, p.text)) for p in papers]


def choose_labels(train: list[Paper], min_count: int, max_labels: int = 0) -> list[str]:
    """Labels frequent enough in the training split, most frequent first (ties by name)."""
    counts = Counter(label for paper in train for label in paper.labels)
    kept = sorted((label for label, n in counts.items() if n >= min_count), key=lambda x: (-counts[x], x))
    if max_labels:
        kept = kept[:max_labels]
    if len(kept) < 2:
        raise DataError(
            f"only {len(kept)} label(s) occur at least {min_count} times in the training split; a model needs 2 or more"
        )
    return kept


def multi_hot(papers: list[Paper], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    targets = np.zeros((len(papers), len(labels)), dtype=np.float32)
    for row, paper in enumerate(papers):
        for label in paper.labels:
            if label in index:
                targets[row, index[label]] = 1.0
    return targets
