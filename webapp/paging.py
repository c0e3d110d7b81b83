"""Pages of the lists that grow with the history: the label filter, full-text search and the review queue.

Counting every match of a frequent label or a common word costs as much as reading the matches (seconds at a
million predictions, bench/scale.py), so these lists count up to ``LIST_COUNT_CAP`` (config) and say "more than"
beyond it, as search engines do; each page's items come from a query that can stop once it has the page.
"""

from __future__ import annotations

import math

from flask import current_app
from flask_sqlalchemy.pagination import SelectPagination
from sqlalchemy import CompoundSelect, Select, event, func, select, text
from sqlalchemy.orm import Session

from .extensions import db


def count_cap() -> int:
    return current_app.config["LIST_COUNT_CAP"]


# PostgreSQL plans a count that stops at the cap as if it read every match: hash joins over a frequent label's
# 660,000 rows (0.4 s at a million predictions, bench/scale.py) where nested loops down the label's index stop after
# the cap (50 ms). For those counts only, the joins that read everything first are off.
_STREAMING_PLAN = ("enable_hashjoin", "enable_mergejoin", "max_parallel_workers_per_gather")


def count_up_to(stmt: Select | CompoundSelect, cap: int | None = None, *, distinct: bool = False) -> int:
    """How many rows ``stmt`` gives, counting no further than ``cap + 1`` (default: ``LIST_COUNT_CAP`` + 1);
    ``distinct``: how many different values its first column holds, when there are no more rows than ``cap`` (a
    DISTINCT over every row first would read them all on PostgreSQL, whose hash cannot stop early)."""
    cap = count_cap() if cap is None else cap
    limited = stmt.order_by(None).limit(cap + 1).subquery()
    compiled = limited.compile(db.session.get_bind())
    key = (str(compiled), repr(sorted(compiled.params.items())))
    known = db.session.info.setdefault(_COUNTS_KEY, {})  # a page asks some counts twice (the plan, then the total)
    if key not in known:
        known[key] = _count(select(func.count()).select_from(limited))
    counted = known[key]
    if distinct and counted <= cap:
        counted = _count(select(func.count(limited.c[0].distinct())))
    return counted


_COUNTS_KEY = "papertag.capped_counts"


@event.listens_for(Session, "after_flush")
@event.listens_for(Session, "after_transaction_end")
def _forget_counts(session: Session, *_: object) -> None:
    """Counts are remembered within one transaction that has not written."""
    session.info.pop(_COUNTS_KEY, None)


def _count(stmt: Select) -> int:
    postgresql = db.session.get_bind().dialect.name == "postgresql"
    if postgresql:
        for setting in _STREAMING_PLAN:
            db.session.execute(text(f"SET LOCAL {setting} = {'0' if setting.startswith('max_') else 'off'}"))
    try:
        return db.session.execute(stmt).scalar_one()
    finally:
        if postgresql:
            for setting in _STREAMING_PLAN:
                db.session.execute(text(f"RESET {setting}"))


class CappedPagination(SelectPagination):
    """Flask-SQLAlchemy's pagination of ``select`` whose count stops at ``LIST_COUNT_CAP`` unless ``exact``; ``more``
    says the list goes on past the count (``total`` is then ``LIST_COUNT_CAP``), and paging on stays possible."""

    more: bool = False

    def _query_count(self) -> int:
        if self._query_args.get("counted") is not None:
            return self._capped(count_up_to(self._query_args["counted"], distinct=True))
        if self._query_args.get("exact"):
            return super()._query_count()
        return self._capped(count_up_to(self._query_args["select"]))

    def _capped(self, counted: int) -> int:
        self.more = counted > count_cap()
        return min(counted, count_cap())

    @property
    def counted(self) -> str:
        """The count as a page shows it: ``10,000+`` when the list goes on past it."""
        return f"{self.total or 0:,}{'+' if self.more else ''}"

    @property
    def pages(self) -> int:
        counted = math.ceil((self.total or 0) / self.per_page) if self.per_page else 0
        if not self.more:
            return counted
        return max(counted, self.page + 1 if len(self.items) == self.per_page else self.page)

    @property
    def has_next(self) -> bool:
        if self.more:
            return len(self.items) == self.per_page
        return self.page < self.pages


def paginate(
    stmt: Select, page: int, per_page: int, *, exact: bool = False, counted: Select | CompoundSelect | None = None
) -> CappedPagination:
    """A page of ``stmt`` (which orders its rows) with a count capped at ``LIST_COUNT_CAP`` unless ``exact``;
    ``counted``: a select whose first column holds as many different values as ``stmt`` has rows, cheaper to
    count."""
    return CappedPagination(
        page=page,
        per_page=per_page,
        max_per_page=None,
        error_out=False,
        select=stmt,
        session=db.session,
        exact=exact,
        counted=counted,
    )
