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
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flask import g
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Float,
    Integer,
    Select,
    false,
    func,
    literal_column,
    select,
    text,
    union_all,
)
from sqlalchemy.sql.selectable import Subquery

from ..curation.annotations import label_map, labelled_selects, stored_label_pairs
from ..extensions import db
from ..models import CurrentLabel, ModelVersion, Prediction, PredictionResult, Taxonomy
from . import paging

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

    @property
    def has_phrase(self) -> bool:
        """Whether a phrase of several words must match (an index of words finds rows with them all, not in order)."""
        return any(" " in phrase for phrase in (*(p for group in self.groups for p in group), *self.excluded))

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
    newest_first = (Prediction.created_at.desc(), Prediction.id.desc())
    if db.session.get_bind().dialect.name == "postgresql":
        vector = literal_column("predictions.search_vector")
        tsquery = func.websearch_to_tsquery(literal_column(f"'{PG_CONFIG}'::regconfig"), query.websearch())
        if pool is None:
            stmt = stmt.where(vector.op("@@")(tsquery))
        else:
            newest = _pg_newest_matches(raw, vector.op("@@")(tsquery), pool, query.has_phrase)
            stmt = stmt.where(paging.among(Prediction.id, newest))
        return stmt.order_by(None).order_by(func.ts_rank(vector, tsquery).desc(), *newest_first)
    if not query.groups:  # only exclusions: FTS5's NOT needs something on its left
        hits = _fts5_hits(Query(groups=(query.excluded,)))
        return stmt.where(Prediction.id.not_in(select(hits.c.id)))
    hits = _fts5_hits(query, pool)
    return stmt.join(hits, hits.c.id == Prediction.id).order_by(None).order_by(hits.c.score, *newest_first)


def matching_ids(raw: str) -> Select:
    """Ids of every prediction whose title or abstract match ``raw``, unranked: what a search counts."""
    return matching(select(Prediction.id), raw).order_by(None)


# PostgreSQL finds a search's matches in its GIN index as a bitmap of rows in no useful order, or by testing rows one
# by one (each row's stored tsvector) down the key; its planner picks by its estimate of how many rows match, which is
# far off for several words (it took 605,000 rows to find the newest 10,000 of a query it thought 10 times more
# frequent: 2.5 s at a million, bench/scale.py). So the pool is first looked for among the newest FIRST_WALK x pool
# rows, tested one by one (a walk of bounded length): a common query fills it there. Otherwise the matches are
# counted up to the pool (the bitmap, whose scan stops there): if they all fit, the bitmap gives them; if not, the walk
# goes on as far as the density met so far says the rest lie, up to WALK_AT_MOST x pool rows in all, and past that the
# matches are sparse and the bitmap of the older rows' matches gives the rest. The bitmap gets the memory to stay
# exact (one bit per row, not per page: a lossy page's every row is tested again). A phrase is the exception: the
# bitmap holds every row with its words in any order, each then tested (1 s for "learning-based image" at a million,
# against 0.2 s to walk to its newest 1,000), so its walk goes on up to WALK_PHRASE_AT_MOST x pool rows and is
# counted only if that was not enough.
FIRST_WALK = 5
WALK_AT_MOST = 60
WALK_PHRASE_AT_MOST = 200
WALK_PLAN = {"enable_bitmapscan": "off", "enable_seqscan": "off"}
BITMAP_PLAN = {"enable_indexscan": "off", "enable_seqscan": "off", "work_mem": "'32MB'"}


def _pg_newest_matches(raw: str, matches: ColumnElement[bool], pool: int, phrase: bool) -> list[int]:
    """Ids of the newest ``pool`` predictions that match ``raw`` (``matches``: its PostgreSQL condition; ``phrase``:
    it has a phrase of several words)."""
    if pool < 1:
        return []
    newest_first = select(Prediction.id).where(matches).order_by(Prediction.id.desc())
    found: list[int] = []  # looked for one past the pool: finding it says the count
    below = (db.session.scalar(select(func.max(Prediction.id))) or 0) + 1
    walked, walk, more = 0, FIRST_WALK * pool, False  # more: counted, more than the pool match
    while below > 1 and walked + walk <= (WALK_PHRASE_AT_MOST if phrase else WALK_AT_MOST) * pool:
        with paging.planned(WALK_PLAN):
            found += db.session.scalars(
                newest_first.where(Prediction.id < below, Prediction.id >= below - walk).limit(pool + 1 - len(found))
            )
        below, walked = below - walk, walked + walk
        if len(found) > pool:
            paging.remember_count(matching_ids(raw), pool, pool + 1)  # the page's count: "more than the pool"
            return found[:pool]
        if walked == walk and not phrase:
            if count_matches(raw, pool) <= pool:
                break  # all the others are in the bitmap below
            more = True
        if more and len(found) == pool:
            return found
        # The rows the rest of the pool needs at the density met so far, with a margin.
        walk = math.ceil(1.5 * (pool + 1 - len(found)) * walked / max(len(found), 1))
    if below > 1:
        with paging.planned(BITMAP_PLAN):
            found += db.session.scalars(newest_first.where(Prediction.id < below).limit(pool + 1 - len(found)))
    # Every match up to one past the pool is in hand: the page's count, not read again.
    paging.remember_count(matching_ids(raw), pool, len(found))
    return found[:pool]


def count_matches(raw: str, cap: int | None = None) -> int:
    """How many predictions match ``raw``, up to ``cap`` + 1 (default ``LIST_COUNT_CAP`` + 1; PostgreSQL reads its
    index's bitmap of matches, whose scan stops there whatever the planner thinks of the words)."""
    return paging.count_up_to(matching_ids(raw), cap, plan=BITMAP_PLAN)


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


def normal_label(label: str) -> str:
    """A label as compared by the filter: case, underscores, hyphens and runs of spaces do not count. Label surgery,
    proposals and bulk actions compare names by it too, so no two labels of a taxonomy read as one."""
    return " ".join(re.split(r"[\s_\-]+", label.casefold())).strip()


def same_label(name: str, labels: Iterable[str]) -> str | None:
    """The label of ``labels`` that reads as ``name`` (:func:`normal_label`), ``name`` itself when it is one of
    them (a taxonomy from before this rule may have two such labels), or None."""
    wanted = normal_label(name)
    found = [label for label in labels if normal_label(label) == wanted]
    return name if name in found else next(iter(found), None)


@dataclass
class TaxonomyLabels:
    """One taxonomy's labels as the filter offers them: its active version's and those found in the history (the
    model's and those curators' corrections gave), in today's names."""

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
    for taxonomy_id, label in db.session.execute(_corrected_label_pairs()):
        found.setdefault(taxonomy_id, set()).add(label)
    return [
        TaxonomyLabels(t.id, t.slug, t.name, sorted(label_map(t.id).vocabulary(sorted(found[t.id])), key=str.casefold))
        for t in taxonomies
    ]


def _corrected_label_pairs() -> Select:
    """(taxonomy id, label) of the current labels of corrected results: a label a curator added (a proposal still
    pending, say) is one the filter finds, so it is known, not looked up as typed. Read from their index alone."""
    return select(CurrentLabel.taxonomy_id, CurrentLabel.label).distinct()


def labels_containing(taxonomy: TaxonomyLabels, typed: str, limit: int = 50) -> list[str]:
    """The taxonomy's labels that contain ``typed`` (case and separators aside); all of them when it is empty."""
    if not typed:
        return taxonomy.labels
    wanted = normal_label(typed)
    return [label for label in taxonomy.labels if wanted in normal_label(label)][:limit]


@dataclass
class LabelLookup:
    """What a typed label names: (taxonomy id, label) pairs in the stored spelling, or suggestions if nothing."""

    matches: list[tuple[int, str]]
    suggestions: list[str]


def lookup_label(typed: str, taxonomies: list[TaxonomyLabels]) -> LabelLookup:
    """The labels of ``taxonomies`` that read as ``typed`` whatever its case and separators; when none does, the
    closest spellings (difflib) to offer instead."""
    wanted = normal_label(typed)
    matches = [(t.id, label) for t in taxonomies for label in t.labels if normal_label(label) == wanted]
    if matches:
        return LabelLookup(matches, [])
    by_normal = {normal_label(label): label for t in taxonomies for label in t.labels}
    close = difflib.get_close_matches(wanted, list(by_normal), n=5, cutoff=0.6)
    starts = [n for n in by_normal if wanted and wanted in n and n not in close][: 5 - len(close)]
    return LabelLookup([], [by_normal[n] for n in close + starts])


def labelled_parts(typed: str, taxonomies: list[TaxonomyLabels], of: Any = None) -> list[Select]:
    """Selects of (result id, prediction id) whose current labels (corrections and label surgery applied) include
    what ``typed`` names in one of ``taxonomies``, a label no taxonomy knows looked up as typed; of prediction ``of``
    only, when given (a correlated test). The history's and the review queue's label filter."""
    names: dict[str, list[int]] = {}
    for taxonomy_id, label in lookup_label(typed, taxonomies).matches or [(t.id, typed) for t in taxonomies]:
        names.setdefault(label, []).append(taxonomy_id)
    return [part for label, ids in names.items() for part in labelled_selects(label, of=of, taxonomy_ids=ids)]


def labelled_predictions(typed: str, taxonomies: list[TaxonomyLabels], of: Any = None) -> CompoundSelect:
    """Ids of the predictions :func:`labelled_parts` gives: one flat union of index range reads, which a count or a
    page can stop early."""
    return _union(labelled_parts(typed, taxonomies, of), 1)


def labelled_results(typed: str, taxonomies: list[TaxonomyLabels], of: Any = None) -> CompoundSelect:
    """Ids of the prediction results :func:`labelled_parts` gives (the review queue lists results)."""
    return _union(labelled_parts(typed, taxonomies, of), 0)


def _union(parts: list[Select], column: int) -> CompoundSelect:
    """One column of ``parts`` as a union (a union that finds nothing when there are none)."""
    if not parts:
        return union_all(select(PredictionResult.prediction_id).where(false()))
    return union_all(*(part.with_only_columns(part.selected_columns[column]) for part in parts))


def taxonomy_predictions(taxonomy_ids: list[int], of: Any = None) -> Select:
    """Ids of the predictions that have a result in one of these taxonomies (of prediction ``of`` only, if given)."""
    found = select(PredictionResult.prediction_id).where(PredictionResult.taxonomy_id.in_(taxonomy_ids))
    return found if of is None else found.where(PredictionResult.prediction_id == of)
