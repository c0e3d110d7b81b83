"""Search that finds: full-text search over predictions' titles and abstracts with the database's own engine
(SQLite FTS5, PostgreSQL full-text search; the index is made by migration ``0010_fulltext_search``), and a label
lookup that forgives case and separators, per taxonomy.

User input never reaches either engine's query syntax as written: ``parse`` reads it with web-search rules
("quoted phrase", ``-word`` excludes, ``or`` between terms) into words made of letters and digits only, and each
engine gets a query rebuilt from those words, so quotes, ``*``, ``NEAR``, parentheses or a stray ``-`` are words
or nothing, never an error.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from flask import g
from sqlalchemy import CompoundSelect, Float, Integer, Select, false, func, literal_column, select, text, union_all
from sqlalchemy.sql.selectable import Subquery

from .curation.annotations import label_map, labelled_selects, stored_label_pairs
from .extensions import db
from .models import ModelVersion, Prediction, PredictionResult, Taxonomy

# The PostgreSQL text search configuration; migration 0010 builds ``predictions.search_vector`` with the same one.
PG_CONFIG = "english"
# A title word weighs this many abstract words in SQLite's bm25 (PostgreSQL: weights A and B in the migration).
TITLE_WEIGHT = 2.0
# Terms read from one query: more would only slow the engine down (the history form keeps 200 characters).
MAX_TERMS = 32

# A quoted phrase (an unbalanced quote runs to the end) or a bare chunk, either optionally led by "-".
_TERM = re.compile(r'(-?)(?:"([^"]*)(?:"|$)|([^\s"]+))')
# A word as both engines' tokenizers cut it: letters and digits (an underscore separates, as in unicode61).
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Query:
    """A parsed search: every group must match (a group matches when any of its phrases does), and no excluded
    phrase may. A phrase is its words joined by spaces."""

    groups: tuple[tuple[str, ...], ...] = ()
    excluded: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.groups and not self.excluded

    def fts5(self) -> str:
        """The FTS5 MATCH expression of the groups (each phrase a quoted string: its words only)."""
        parts = [f"({' OR '.join(_quoted(p) for p in group)})" for group in self.groups]
        return " AND ".join(parts) + "".join(f" NOT {_quoted(p)}" for p in self.excluded)

    def websearch(self) -> str:
        """The same query in ``websearch_to_tsquery``'s syntax, rebuilt from the words."""
        parts = [" or ".join(_quoted(p) for p in group) for group in self.groups]
        return " ".join(parts + [f"-{_quoted(p)}" for p in self.excluded])


def _quoted(phrase: str) -> str:
    return f'"{phrase}"'  # words only: no quote can be inside


def parse(raw: str) -> Query:
    """Read a search box's text with web-search rules; anything else in it is ignored, not an error."""
    groups: list[list[str]] = []
    excluded: list[str] = []
    join_next = False
    for match in _TERM.finditer(raw):
        if len(groups) + len(excluded) >= MAX_TERMS:
            break
        negated, quoted, bare = match.group(1) == "-", match.group(2), match.group(3)
        if quoted is None and not negated and bare.lower() == "or" and groups:
            join_next = True
            continue
        phrase = " ".join(_WORD.findall(quoted if quoted is not None else bare))
        if not phrase:
            continue
        if negated:
            excluded.append(phrase)
        elif join_next:
            groups[-1].append(phrase)
        else:
            groups.append([phrase])
        join_next = False
    return Query(tuple(tuple(g) for g in groups), tuple(excluded))


def matching(stmt: Select, raw: str, pool: int | None = None) -> Select:
    """``stmt`` (a select of predictions) narrowed to those whose title or abstract match ``raw``, in any word
    order, most relevant first (ties newest first); a query with no words matches nothing. With ``pool``, only the
    newest ``pool`` matches are ranked: ranking scores every match it ranks (bm25, ts_rank), 0.3 s for a query that
    matches a fifth of a million abstracts (bench/scale.py), and a query that broad wants more words."""
    query = parse(raw)
    if query.empty:
        return stmt.where(false())
    newest = (Prediction.created_at.desc(), Prediction.id.desc())
    if db.session.get_bind().dialect.name == "postgresql":
        vector = literal_column("predictions.search_vector")
        tsquery = func.websearch_to_tsquery(literal_column(f"'{PG_CONFIG}'::regconfig"), query.websearch())
        stmt = stmt.where(vector.op("@@")(tsquery))
        if pool is not None:
            newest_hits = select(Prediction.id).where(vector.op("@@")(tsquery)).order_by(Prediction.id.desc())
            stmt = stmt.where(Prediction.id.in_(newest_hits.limit(pool)))
        return stmt.order_by(None).order_by(func.ts_rank(vector, tsquery).desc(), *newest)
    if not query.groups:  # only exclusions: FTS5's NOT needs something on its left
        hits = _fts5_hits(Query(groups=(query.excluded,)))
        return stmt.where(Prediction.id.not_in(select(hits.c.id)))
    hits = _fts5_hits(query, pool)
    return stmt.join(hits, hits.c.id == Prediction.id).order_by(None).order_by(hits.c.score, *newest)


def matching_ids(raw: str) -> Select:
    """Ids of every prediction whose title or abstract match ``raw``, unranked: what a search counts."""
    return matching(select(Prediction.id), raw).order_by(None)


def _fts5_hits(query: Query, pool: int | None = None) -> Subquery:
    """The FTS5 matches of ``query`` as a subquery with columns id and score (bm25: lower is better); with
    ``pool``, the newest ``pool`` of them (FTS5 walks its matches by rowid and scores only those)."""
    newest = "" if pool is None else f" ORDER BY rowid DESC LIMIT {int(pool)}"
    return (
        text(
            f"SELECT rowid AS id, bm25(predictions_fts, {TITLE_WEIGHT}, 1.0) AS score "
            f"FROM predictions_fts WHERE predictions_fts MATCH :match{newest}"
        )
        .bindparams(match=query.fts5())
        .columns(id=Integer, score=Float)
        .subquery("fts_hits")
    )


def like_matching(stmt: Select, raw: str) -> Select:
    """The search this module replaced (one substring, LIKE over both columns): kept as the baseline of
    ``bench/search.py``."""
    pattern = "%" + raw.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return stmt.where(Prediction.title.ilike(pattern, escape="\\") | Prediction.abstract.ilike(pattern, escape="\\"))


def has_control_characters(typed: str) -> bool:
    """Whether a typed name holds a control character, NUL or lone surrogate: no stored label or version has one
    (corrections.check_label refuses them), so a filter by it is a mistake, not a search."""
    return any(unicodedata.category(ch).startswith("C") for ch in typed)


def _normal(label: str) -> str:
    """A label as compared by the filter: case, underscores, hyphens and runs of spaces do not count."""
    return " ".join(re.split(r"[\s_\-]+", label.casefold())).strip()


@dataclass
class TaxonomyLabels:
    """One taxonomy's labels as the filter offers them: its active version's and those found in the history,
    in today's names."""

    id: int
    slug: str
    name: str
    labels: list[str] = field(default_factory=list)


def taxonomy_labels(slug: str = "") -> list[TaxonomyLabels]:
    """Every taxonomy (or the one named by ``slug``) with its labels sorted case-insensitively: the suggestions and
    what the label filter matches; read once per request (the page and its filter both ask)."""
    if "taxonomy_labels" not in g:
        g.taxonomy_labels = _read_taxonomy_labels()
    return [t for t in g.taxonomy_labels if not slug or t.slug == slug]


def _read_taxonomy_labels() -> list[TaxonomyLabels]:
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.name)).all()
    found: dict[int, set[str]] = {t.id: set() for t in taxonomies}
    active = select(ModelVersion.taxonomy_id, ModelVersion.labels).join(
        Taxonomy, Taxonomy.active_version_id == ModelVersion.id
    )
    for taxonomy_id, labels in db.session.execute(active):
        found[taxonomy_id].update(labels or [])
    for taxonomy_id, label in stored_label_pairs():
        found.setdefault(taxonomy_id, set()).add(label)
    return [
        TaxonomyLabels(t.id, t.slug, t.name, sorted(label_map(t.id).vocabulary(sorted(found[t.id])), key=str.casefold))
        for t in taxonomies
    ]


def labels_containing(taxonomy: TaxonomyLabels, typed: str, limit: int = 50) -> list[str]:
    """The taxonomy's labels that contain ``typed`` (case and separators aside); all of them when it is empty."""
    if not typed:
        return taxonomy.labels
    wanted = _normal(typed)
    return [label for label in taxonomy.labels if wanted in _normal(label)][:limit]


@dataclass
class LabelLookup:
    """What a typed label names: (taxonomy id, label) pairs in the stored spelling, or suggestions if nothing."""

    matches: list[tuple[int, str]]
    suggestions: list[str]


def lookup_label(typed: str, taxonomies: list[TaxonomyLabels]) -> LabelLookup:
    """The labels of ``taxonomies`` that read as ``typed`` whatever its case and separators; when none does, the
    closest spellings (difflib) to offer instead."""
    wanted = _normal(typed)
    matches = [(t.id, label) for t in taxonomies for label in t.labels if _normal(label) == wanted]
    if matches:
        return LabelLookup(matches, [])
    by_normal = {_normal(label): label for t in taxonomies for label in t.labels}
    close = difflib.get_close_matches(wanted, list(by_normal), n=5, cutoff=0.6)
    starts = [n for n in by_normal if wanted and wanted in n and n not in close][: 5 - len(close)]
    return LabelLookup([], [by_normal[n] for n in close + starts])


def labelled_predictions(typed: str, taxonomies: list[TaxonomyLabels], of: Any = None) -> CompoundSelect:
    """Ids of the predictions whose current labels (corrections and label surgery applied) include what ``typed``
    names in one of ``taxonomies``, a label no taxonomy knows looked up as typed; of prediction ``of`` only, when
    given (a correlated test). One flat union of index range reads, which a count or a page can stop early."""
    names: dict[str, list[int]] = {}
    for taxonomy_id, label in lookup_label(typed, taxonomies).matches or [(t.id, typed) for t in taxonomies]:
        names.setdefault(label, []).append(taxonomy_id)
    parts = [
        part.with_only_columns(part.selected_columns[1])
        for label, ids in names.items()
        for part in labelled_selects(label, of=of, taxonomy_ids=ids)
    ]
    return union_all(*parts) if parts else union_all(select(PredictionResult.prediction_id).where(false()))


def taxonomy_predictions(taxonomy_ids: list[int], of: Any = None) -> Select:
    """Ids of the predictions that have a result in one of these taxonomies (of prediction ``of`` only, if given)."""
    found = select(PredictionResult.prediction_id).where(PredictionResult.taxonomy_id.in_(taxonomy_ids))
    return found if of is None else found.where(PredictionResult.prediction_id == of)
