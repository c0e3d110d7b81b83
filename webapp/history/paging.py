"""Pages of the lists that grow with the history: the label filter, full-text search and the review queue.

Counting every match of a frequent label or a common word costs as much as reading the matches (seconds at a
million predictions, bench/scale.py), so these lists count up to ``LIST_COUNT_CAP`` (config) and say "more than"
beyond it, as search engines do; each page's items come from a query that can stop once it has the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flask import abort, current_app
from flask_sqlalchemy.pagination import Pagination, SelectPagination
from sqlalchemy import ColumnElement, CompoundSelect, Select, bindparam, event, func, select, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.orm.interfaces import ORMOption
from sqlalchemy.sql.selectable import Subquery

from ..extensions import db


def count_cap() -> int:
    return current_app.config["LIST_COUNT_CAP"]


# PostgreSQL plans a count that stops at the cap as if it read every match: hash joins over a frequent label's
# 660,000 rows (0.4 s at a million predictions, bench/scale.py) where nested loops down the label's index stop after
# the cap (50 ms). For those counts only, the joins that read everything first are off.
STREAMING_PLAN = {"enable_hashjoin": "off", "enable_mergejoin": "off", "max_parallel_workers_per_gather": "0"}


@contextmanager
def planned(settings: Mapping[str, str]) -> Iterator[None]:
    """PostgreSQL's planner ``settings`` for the statements run inside (``SET LOCAL``, reset after); nothing on
    SQLite. For the few queries whose cost the planner misjudges at scale (bench/scale.py). Not reset after an
    error: the transaction is then aborted and ends the settings with it, and the error stays the one raised (a
    RESET in the aborted transaction would raise its own)."""
    postgresql = db.session.get_bind().dialect.name == "postgresql"
    if postgresql:
        for name, value in settings.items():
            db.session.execute(text(f"SET LOCAL {name} = {value}"))
    yield
    if postgresql:
        for name in settings:
            db.session.execute(text(f"RESET {name}"))


def count_up_to(
    stmt: Select | CompoundSelect,
    cap: int | None = None,
    *,
    distinct: bool = False,
    plan: Mapping[str, str] | None = None,
) -> int:
    """How many rows ``stmt`` gives, counting no further than ``cap + 1`` (default: ``LIST_COUNT_CAP`` + 1);
    ``distinct``: how many different values its first column holds, when there are no more rows than ``cap`` (a
    DISTINCT over every row first would read them all on PostgreSQL, whose hash cannot stop early); ``plan``: more
    planner settings (:func:`planned`)."""
    cap = count_cap() if cap is None else cap
    limited = stmt.order_by(None).limit(cap + 1).subquery()
    counted = _remembered(limited, lambda: _count(select(func.count()).select_from(limited), plan), _COUNTED)
    if distinct and counted <= cap:
        counted = _count(select(func.count(limited.c[0].distinct())), plan)
    return counted


def remember_count(stmt: Select | CompoundSelect, cap: int, counted: int) -> None:
    """Record what :func:`count_up_to` (``stmt``, ``cap``) would give, learned another way, for this transaction."""
    limited = stmt.order_by(None).limit(cap + 1).subquery()
    _remembered(limited, lambda: counted, _COUNTED)


def ids_up_to(stmt: Select | CompoundSelect) -> list[int]:
    """The first column of ``stmt``'s rows (ids), no more than ``LIST_COUNT_CAP`` + 1 of them: a set filter is
    read once per page and then both counted and used as a list, rather than read again inside the page's query
    (its joins cost more than its ids: 90 of 130 ms for a label with 4,700 matches at a million, PostgreSQL)."""
    limited = stmt.order_by(None).limit(count_cap() + 1).subquery()

    def read() -> list[int]:
        with planned(STREAMING_PLAN):
            return list(db.session.scalars(select(limited.c[0])))

    return _remembered(limited, read, "ids")


def among(column: ColumnElement[int], ids: Iterable[int]) -> ColumnElement[bool]:
    """``column IN (ids)`` with the ids written into the statement (whole numbers only), so no database's limit on
    bound parameters applies to a list as long as ``LIST_COUNT_CAP``."""
    values = sorted({int(i) for i in ids})
    return column.in_(bindparam("among_ids", values, expanding=True, literal_execute=True, unique=True))


# On SQLite a list of a set's matches, newest first, either looks each match up by id and sorts them (about 8 µs a
# match) or walks the date index from the newest prediction, testing each against the set (about 0.125 µs a step),
# until it has its rows: 1M predictions, warm; the walk reads the small index, the look-ups the table's pages
# (bench/results/scale.md, session 19).
STEPS_PER_LOOKUP = 64


def among_newest(column: InstrumentedAttribute[int], ids: Iterable[int], reach: int | None) -> ColumnElement[bool]:
    """:func:`among` for a list read newest first as far as its ``reach``-th row (None: all of them). On SQLite,
    where ids grow with time, the predictions newer than the ``reach``-th newest match estimate the walk down the
    date index; when that is cheaper than looking every match up, the test is written so that SQLite walks."""
    values = sorted({int(i) for i in ids})
    if reach is None or not 0 < reach < len(values) or db.session.get_bind().dialect.name != "sqlite":
        return among(column, values)
    steps = (db.session.scalar(select(func.max(column))) or 0) - values[-reach]
    if steps > STEPS_PER_LOOKUP * len(values):
        return among(column, values)
    return among(column + 0, values)  # not a look-up by id: SQLite walks the index the list is sorted by


_MEMO_KEY = "papertag.capped_reads"
_COUNTED = "count"


def _remembered(limited: Subquery, read: Callable[[], Any], what: str) -> Any:
    """``read()``, once per transaction for the same statement and ``what`` it reads: a page asks the same count or
    ids twice (its plan, then its total)."""
    compiled = limited.compile(db.session.get_bind())
    key = (str(compiled), repr(sorted(compiled.params.items())), what)
    known = db.session.info.setdefault(_MEMO_KEY, {})
    if key not in known:
        known[key] = read()
    return known[key]


@event.listens_for(Session, "after_flush")
@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, *_: object) -> None:
    """Counts and ids are remembered within one transaction that has not written."""
    session.info.pop(_MEMO_KEY, None)


def _count(stmt: Select, plan: Mapping[str, str] | None) -> int:
    with planned({**STREAMING_PLAN, **(plan or {})}):
        return db.session.execute(stmt).scalar_one()


class CappedPagination(SelectPagination):
    """Flask-SQLAlchemy's pagination of ``select`` whose count stops at ``LIST_COUNT_CAP`` unless ``exact``; ``more``
    says the list goes on past the count (``total`` is then ``LIST_COUNT_CAP``), and paging on stays possible."""

    more: bool = False
    next_row: bool = False  # a row follows this page's

    def _query_items(self) -> list[Any]:
        """The page's rows, read with the one after them: past a count stopped at the cap, that row is what says
        a next page has any, so "next" never leads to an empty page (which is past the end: a 404)."""
        rows = self._rows(self._query_offset, self.per_page + 1)
        self.next_row = len(rows) > self.per_page
        return rows[: self.per_page]

    def _rows(self, offset: int, limit: int) -> list[Any]:
        """The page's keys first, then its rows by key (with ``load``'s loader options): the sort of a set filter's
        thousands of matches reads their keys and sort columns, not their abstracts (a label of 9,000 predictions
        at a million, SQLite: 62 -> 41 ms)."""
        session: Session = self._query_args["session"]
        stmt: Select = self._query_args["select"]
        entity = stmt.column_descriptions[0]["entity"]
        key = sa_inspect(entity).primary_key[0]
        keys = list(dict.fromkeys(session.scalars(stmt.with_only_columns(key).limit(limit).offset(offset))))
        if not keys:
            return []
        found = session.scalars(select(entity).where(among(key, keys)).options(*self._query_args.get("load", ())))
        by_key = {getattr(row, key.key): row for row in found}
        return [by_key[k] for k in keys if k in by_key]  # a row deleted in between is left out

    def _query_count(self) -> int:
        counted = self._query_args.get("counted")
        if isinstance(counted, int):
            return self._capped(counted)
        if counted is not None:
            ids = ids_up_to(counted)
            return self._capped(len(ids) if len(ids) > count_cap() else len(set(ids)))
        if self._query_args.get("exact"):
            return super()._query_count()
        return self._capped(count_up_to(self._query_args["select"]))

    def _capped(self, counted: int) -> int:
        pool = self._query_args.get("pool")
        cap = count_cap() if pool is None else pool
        self.more = counted > cap
        return min(counted, cap)

    @property
    def counted(self) -> str:
        """The count as a page shows it: ``10,000+`` when the list goes on past it."""
        return f"{self.total or 0:,}{'+' if self.more else ''}"

    @property
    def pages(self) -> int:
        counted = math.ceil((self.total or 0) / self.per_page) if self.per_page else 0
        if self.more:
            counted = max(counted, self.page + 1 if self.next_row else self.page)
        pool = self._query_args.get("pool")
        if pool is not None and self.per_page:
            counted = min(counted, math.ceil(pool / self.per_page))
        return counted

    @property
    def pages_go_on(self) -> bool:
        """Whether there may be pages past ``pages`` (the count stopped at the cap; a pool's pages end with it)."""
        return self.more and self._query_args.get("pool") is None

    @property
    def has_next(self) -> bool:
        if self.pages_go_on:
            return self.next_row
        return self.page < self.pages


def refuse_past_the_end(pagination: Pagination) -> None:
    """A 404 naming the last page for a page past a list's end (page 1 of an empty list is the list, empty): every
    list of the history and curation pages answers it alike, never an empty 200 that reads as "nothing to do"."""
    if pagination.page == 1 or pagination.items:
        return
    capped = isinstance(pagination, CappedPagination) and pagination.more  # counted to the cap: no last page known
    end = "the list ends before it" if capped else f"the last page is {pagination.pages or 1}"
    abort(404, description=f"there is no page {pagination.page}; {end}")


def paginate(
    stmt: Select,
    page: int,
    per_page: int,
    *,
    load: Sequence[ORMOption] = (),
    exact: bool = False,
    counted: Select | CompoundSelect | int | None = None,
    pool: int | None = None,
) -> CappedPagination:
    """A page of ``stmt`` (which orders the rows of one mapped class; ``load``: loader options for the page's rows)
    with a count capped at ``LIST_COUNT_CAP`` unless ``exact``;
    ``counted``: a select whose first column holds as many different values as ``stmt`` has rows, cheaper to
    count (its ids are read, as :func:`ids_up_to` reads them), or the count itself (up to the cap + 1);
    ``pool``: ``stmt`` gives its first ``pool`` rows only (a search's ranked pool), so the count is capped there
    and so are the pages."""
    return CappedPagination(
        page=page,
        per_page=per_page,
        max_per_page=None,
        error_out=False,
        select=stmt,
        session=db.session,
        load=load,
        exact=exact,
        counted=counted,
        pool=pool,
    )
