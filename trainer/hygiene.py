"""Taxonomy hygiene: labels that name the same task in different spellings ("question_answering" beside "Question
Answering", "Language Modelling" beside "language_modeling", "Lipreading" beside "Lip Reading").

A model trained on both halves of such a pair splits one task's papers between two outputs and is scored wrong for
answering either; curators see two chips for one thing. The finder groups labels by a spelling key and proposes a
``label_aliases`` map (the trainer's existing mechanism), so the shipped data files stay as they were shipped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .config import ConfigError

SEPARATORS = re.compile(r"[\s_\-]+")
# British -ise/-isation beside American -ize/-ization ("normalisation", "normalization").
ISE = re.compile(r"is(e|ed|es|ing|ation|ations)\b")
# A doubled letter beside a single one ("modelling", "modeling"; "labelled", "labeled").
DOUBLED = re.compile(r"([a-z])\1")


def spelling_key(label: str) -> str:
    """What is left of a label once case, separators (spaces, underscores, hyphens) and the obvious spelling
    variants are taken away: two labels with one key name one task."""
    key = SEPARATORS.sub(" ", label.lower()).strip()
    key = ISE.sub(r"iz\1", key)
    key = DOUBLED.sub(r"\1", key)
    return key.replace(" ", "")


def _readability(label: str) -> tuple[bool, bool]:
    """Human-written names ("Question Answering") before identifiers ("question_answering")."""
    return "_" not in label, label[:1].isupper()


def canonical(group: Iterable[str], counts: Counter[str] | None = None) -> str:
    """The name a group of spellings is merged into: the most used one, then the most readable, then the first
    alphabetically (so the choice never depends on the order labels were met in)."""
    counts = counts or Counter()
    return sorted(group, key=lambda label: (-counts[label], *(not flag for flag in _readability(label)), label))[0]


def duplicate_groups(labels: Iterable[str]) -> list[list[str]]:
    """Every set of two or more distinct labels sharing a spelling key, each sorted, the groups sorted."""
    by_key: dict[str, set[str]] = {}
    for label in labels:
        by_key.setdefault(spelling_key(label), set()).add(label)
    return sorted(sorted(group) for group in by_key.values() if len(group) > 1)


def propose_aliases(counts: Counter[str]) -> dict[str, str]:
    """A ``label_aliases`` map merging every duplicate group of ``counts`` (label -> papers) into its canonical
    name."""
    aliases: dict[str, str] = {}
    for group in duplicate_groups(counts):
        target = canonical(group, counts)
        aliases.update({label: target for label in group if label != target})
    return dict(sorted(aliases.items()))


def remaining_duplicates(labels: Iterable[str], aliases: dict[str, str]) -> list[list[str]]:
    """The duplicate groups still there once ``aliases`` is applied: empty when a config's aliases cover the data."""
    return duplicate_groups({aliases.get(label, label) for label in labels})


def read_aliases(path: Path) -> dict[str, str]:
    """A label alias file: one JSON object of label -> canonical label (``data/*/label-aliases.json``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"label alias file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"label alias file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"label alias file {path} must hold one JSON object of label -> canonical label")
    chained = sorted(label for label, target in data.items() if target in data)
    if chained:
        raise ConfigError(f"label alias file {path}: targets that are themselves aliased: {', '.join(chained)}")
    return data
