"""Label surgery rules: a taxonomy's renames, merges and splits compiled into one mapping, applied when labels are
read. Stored predictions and annotation events keep the names they were written with; this turns those names into
the current label set. No Flask and no database here: the trainer imports it to relabel its base papers with the
very same rules.

Every change is a rule ``sources -> targets``: a rename is one source and one target, a merge several sources and
one target, a split one source and several targets, each with optional keywords. A label carrying a source goes to
every target whose keywords occur in the paper's title or abstract (case-insensitive, whole words), else to the
default target (the first one without keywords); renames and merges have that default only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

KINDS = ("rename", "merge", "split")


@dataclass(frozen=True)
class Target:
    name: str
    keywords: tuple[str, ...] = ()

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """Any keyword as a whole word: not preceded or followed by a letter or digit (so "C++" works too)."""
        if not self.keywords:
            return None
        words = "|".join(re.escape(keyword) for keyword in self.keywords)
        return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    """One label change, in the order it was made."""

    id: int
    kind: str
    sources: tuple[str, ...]
    targets: tuple[Target, ...]
    created_at: datetime | None = None
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple((t.name, t.pattern) for t in self.targets if t.pattern is not None)
        object.__setattr__(self, "patterns", compiled)

    @property
    def default(self) -> str:
        return next(t.name for t in self.targets if not t.keywords)

    @property
    def names(self) -> set[str]:
        """Every label this change reads or writes."""
        return set(self.sources) | {t.name for t in self.targets}

    def route(self, text: str) -> list[str]:
        """The targets a source label goes to for this paper's text."""
        matched = [name for name, pattern in self.patterns if pattern.search(text)]
        return matched or [self.default]

    @classmethod
    def from_payload(cls, id: int, kind: str, payload: dict[str, Any], created_at: datetime | None = None) -> Rule:
        """From the stored JSON: rename ``{"from", "to"}``, merge ``{"sources", "into"}``, split ``{"label",
        "targets": [{"name", "keywords"}]}``."""
        if kind == "rename":
            return cls(id, kind, (payload["from"],), (Target(payload["to"]),), created_at)
        if kind == "merge":
            return cls(id, kind, tuple(payload["sources"]), (Target(payload["into"]),), created_at)
        targets = tuple(Target(t["name"], tuple(t.get("keywords") or ())) for t in payload["targets"])
        return cls(id, kind, (payload["label"],), targets, created_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "sources": list(self.sources),
            "targets": [{"name": t.name, "keywords": list(t.keywords)} for t in self.targets],
            "created_at": self.created_at.isoformat() + "Z" if self.created_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        """The inverse of :meth:`to_json` (what ``GET /api/v1/taxonomies/<slug>/label-changes`` lists)."""
        created = data.get("created_at")
        return cls(
            int(data["id"]),
            str(data["kind"]),
            tuple(data["sources"]),
            tuple(Target(t["name"], tuple(t.get("keywords") or ())) for t in data["targets"]),
            datetime.fromisoformat(created.removesuffix("Z")) if created else None,
        )


class LabelMap:
    """The not-undone changes of one taxonomy, applied in order. An empty map changes nothing."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = list(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _rules(self, until: datetime | None) -> list[Rule]:
        if until is None:
            return self.rules
        return [r for r in self.rules if r.created_at is None or r.created_at <= until]

    def map_label(self, label: str, text: str, until: datetime | None = None) -> set[str]:
        """What one stored label is now for this paper (``until``: only the changes made by then)."""
        labels = {label}
        for rule in self._rules(until):
            if labels & set(rule.sources):
                labels = (labels - set(rule.sources)) | set(rule.route(text))
        return labels

    def map_labels(self, labels: Iterable[str], text: str, until: datetime | None = None) -> list[str]:
        return sorted({new for label in labels for new in self.map_label(label, text, until)})

    def vocabulary(self, labels: Iterable[str]) -> list[str]:
        """A label list renamed, merged and split (a split label becomes all of its targets), in its order: a new
        name takes the place of its first source."""
        current = list(dict.fromkeys(labels))
        for rule in self.rules:
            if set(current) & set(rule.sources):
                replaced = ([t.name for t in rule.targets] if label in rule.sources else [label] for label in current)
                current = list(dict.fromkeys(name for names in replaced for name in names))
        return current

    def sources(self, label: str) -> tuple[set[str], bool]:
        """Stored names that may read as ``label`` now (none for a retired name), and whether a keyword split
        decides it per paper (then only the paper's text tells)."""
        names, by_text = {label}, False
        for rule in reversed(self.rules):
            if names & {t.name for t in rule.targets}:
                names |= set(rule.sources)
                by_text = by_text or bool(rule.patterns)
        return {name for name in names if label in self.vocabulary([name])}, by_text

    def map_scores(
        self, scores: dict[str, float], thresholds: dict[str, float], text: str
    ) -> dict[str, tuple[float, float]]:
        """label -> (score, threshold) in the current names. A merged label takes the source that clears its
        threshold by the most (with one threshold for every label: the highest score); a split target the text
        does not route to scores 0."""
        out: dict[str, tuple[float, float]] = {}
        for label, score in scores.items():
            threshold = thresholds.get(label, 0.5)
            routed = self.map_label(label, text)
            for name in self.vocabulary([label]):
                candidate = (score if name in routed else 0.0, threshold)
                best = out.get(name)
                if best is None or candidate[0] - candidate[1] > best[0] - best[1]:
                    out[name] = candidate
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [rule.to_json() for rule in self.rules]

    @classmethod
    def from_json(cls, rules: list[dict[str, Any]]) -> LabelMap:
        return cls(Rule.from_json(rule) for rule in rules)
