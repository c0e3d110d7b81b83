"""Labelled abstracts: reading JSONL/CSV, merging corrections, label filtering, splits, multi-hot targets."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from webapp.serving.bundle import compose_text
from webapp.surgery import LabelMap

LABEL_SEPARATORS = ("|", ";")
# Canonical field names and where each is read from unless the config maps it (e.g. {"id": "pmid"}).
FIELDS = ("id", "title", "abstract", "labels")
# New-style arXiv ids (YYMM.NNNN[N], optional version) and old-style ones (archive[.XX]/YYMMNNN).
NEW_ARXIV_ID = re.compile(r"^(?:arxiv:)?(\d{2})(\d{2})\.(\d{4,5})(?:v\d+)?$", re.IGNORECASE)
OLD_ARXIV_ID = re.compile(r"^(?:arxiv:)?[a-z-]+(?:\.[a-z]{2})?/(\d{2})(\d{2})(\d{3})(?:v\d+)?$", re.IGNORECASE)


class DataError(ValueError):
    """Unusable training data; the message names the file and the problem."""


@dataclass
class Paper:
    id: str
    title: str
    abstract: str
    labels: list[str]
    # A curator's correction (or a paper a correction overrode): it always trains, whatever its id says.
    corrected: bool = False

    @property
    def text(self) -> str:
        return compose_text(self.title, self.abstract)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _paper_from(record: dict[str, Any], where: str, fields: dict[str, str]) -> Paper:
    """One paper from a record; ``fields`` maps canonical names to the record's keys ("" = absent, like a set
    without titles). An explicit empty label list is a true negative ("none of these"); a missing one is an error."""
    abstract = record.get(fields["abstract"])
    if not isinstance(abstract, str) or not abstract.strip():
        raise DataError(f"{where}: no abstract text (field {fields['abstract']!r})")
    if fields["labels"] not in record:
        raise DataError(f"{where}: no {fields['labels']!r} field (use [] for a paper with none of the labels)")
    labels = record.get(fields["labels"])
    if labels is None:
        labels = []
    if isinstance(labels, str):
        separator = next((s for s in LABEL_SEPARATORS if s in labels), None)
        labels = labels.split(separator) if separator else [labels]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise DataError(f"{where}: labels must be a list of strings")
    labels = sorted({label.strip() for label in labels if label.strip()})
    title = record.get(fields["title"]) if fields["title"] else ""
    if title is not None and not isinstance(title, str):
        raise DataError(f"{where}: title must be a string")
    title = title or ""
    raw_id = record.get(fields["id"]) if fields["id"] else None
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise DataError(f"{where}: id must be a string or a number")
    paper_id = str(raw_id or "") or text_key(title, abstract)
    return Paper(id=paper_id, title=title.strip(), abstract=abstract.strip(), labels=labels)


def field_map(mapping: dict[str, str] | None = None) -> dict[str, str]:
    """The complete canonical -> record key map: the defaults overridden by ``mapping``."""
    mapping = mapping or {}
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise DataError(f"unknown field names {unknown} in the field map (known: {', '.join(FIELDS)})")
    return {name: mapping.get(name, name) for name in FIELDS}


def read_papers(path: str | Path, fields: dict[str, str] | None = None) -> list[Paper]:
    """Read a JSONL or CSV file (optionally gzip'd) of ``id, title, abstract, labels`` rows (other field names
    through ``fields``, see :func:`field_map`).

    CSV labels are separated by ``|`` or ``;``; an empty labels cell or ``[]`` is a paper with none of the labels.
    Any row without text or a labels field is an error that names the row: silently dropping rows would hide a
    broken export.
    """
    path = Path(path)
    fields = field_map(fields)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    is_csv = ".csv" in path.suffixes
    papers: list[Paper] = []
    try:
        with _open_text(path) as handle:
            if is_csv:
                reader = csv.DictReader(handle)
                fieldnames = {name.strip().lower() for name in reader.fieldnames or []}
                needed = {fields["abstract"].lower(), fields["labels"].lower()}
                if not needed <= fieldnames:
                    raise DataError(f"{path}: CSV needs {sorted(needed)} columns, found {sorted(fieldnames)}")
                lowered = {name: key.lower() for name, key in fields.items()}
                for number, row in enumerate(reader, start=2):
                    record = {key.strip().lower(): value for key, value in row.items() if key}
                    papers.append(_paper_from(record, f"{path} row {number}", lowered))
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
                    papers.append(_paper_from(record, f"{path} line {number}", fields))
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
            merged.append(Paper(correction.id, correction.title, correction.abstract, correction.labels, True))
            counts["added"] += 1
        else:
            base = merged[index]
            merged[index] = Paper(base.id, base.title, base.abstract, correction.labels, True)
            counts["overridden"] += 1
    return merged, counts


def _bucket(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key``."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def in_sample(paper_id: str, fraction: float) -> bool:
    """Whether a paper belongs to the deterministic ``fraction`` sample (salted: independent of its split)."""
    return fraction >= 1 or _bucket(f"sample:{paper_id}") < fraction


def arxiv_order(paper_id: str) -> tuple[int, int, int] | None:
    """(year, month, number) of an arXiv id, the order papers were submitted in; None for other ids."""
    match = NEW_ARXIV_ID.match(paper_id) or OLD_ARXIV_ID.match(paper_id)
    if not match:
        return None
    yy, month, number = (int(group) for group in match.groups())
    if not 1 <= month <= 12:
        return None
    year = 2000 + yy if match.re is NEW_ARXIV_ID or yy < 91 else 1900 + yy
    return year, month, number


def newest_cutoff(papers: list[Paper], fraction: float) -> tuple[int, int, int] | None:
    """The arXiv order from which the newest ``fraction`` of the dated papers on belong to the *newest* split:
    papers submitted after everything the model trains on, as it meets them in use. None when nothing is dated."""
    orders = sorted(order for order in (arxiv_order(p.id) for p in papers) if order is not None)
    if not orders or fraction <= 0:
        return None
    return orders[min(len(orders) - 1, int(len(orders) * (1 - fraction)))]


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
    return [
        Paper(p.id, p.title, p.abstract, sorted({aliases.get(x, x) for x in p.labels}), p.corrected) for p in papers
    ]


def relabel(papers: list[Paper], label_map: LabelMap) -> list[Paper]:
    """The site's label changes (renames, merges, keyword splits) applied to every paper, base data included, by
    the same rule the site reads its stored labels with."""
    if not label_map:
        return papers
    return [Paper(p.id, p.title, p.abstract, label_map.map_labels(p.labels, p.text), p.corrected) for p in papers]


def choose_labels(train: list[Paper], min_count: int, max_labels: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """Labels frequent enough in the training split, most frequent first (ties by name), and the dropped ones
    with their counts (so a run can say what it left out)."""
    counts = Counter(label for paper in train for label in paper.labels)
    ranked = sorted(counts, key=lambda x: (-counts[x], x))
    kept = [label for label in ranked if counts[label] >= min_count]
    if max_labels:
        kept = kept[:max_labels]
    if len(kept) < 2:
        raise DataError(
            f"only {len(kept)} label(s) occur at least {min_count} times in the training split; a model needs 2 or more"
        )
    chosen = set(kept)
    return kept, [(label, counts[label]) for label in ranked if label not in chosen]


def multi_hot(papers: list[Paper], labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    targets = np.zeros((len(papers), len(labels)), dtype=np.float32)
    for row, paper in enumerate(papers):
        for label in paper.labels:
            if label in index:
                targets[row, index[label]] = 1.0
    return targets
