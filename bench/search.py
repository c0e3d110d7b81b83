"""History search speed: full-text search (issue 12 point 8, webapp/history/search.py) against the substring LIKE
scan it replaced, in one run on one database.

In a temporary DATA_DIR (SQLite; or a fresh database on the PostgreSQL server of --postgres, dropped after) it
migrates to head and stores --rows predictions cycling through the shipped Papers-with-Code abstracts (titles and
abstracts as shipped), so the migration's triggers (SQLite) or generated column (PostgreSQL) index them. Then for
--queries search strings (the issue's "Segmentation networks" and two neighbouring words of seeded-random titles)
it times what the history page asks the database, count and first page, with each method in turn, the order
alternating, for --rounds rounds. Prints p50/p95 per method, the ratio full-text/LIKE and how many queries each
method finds something for (LIKE needs the words adjacent and in order).

    python bench/search.py [--rows 20000] [--queries 40] [--rounds 3] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from sqlalchemy import Select, func, insert, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.history import search  # noqa: E402
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER  # noqa: E402
from webapp.models import Prediction  # noqa: E402
from webapp.serving.registry import live_models  # noqa: E402

PAPERS = REPO / "data" / "pwc-tasks" / "papers.jsonl.gz"
PAGE = 20  # the history's page size (HISTORY_PER_PAGE)


def papers() -> list[dict]:
    with gzip.open(PAPERS, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def queries(shipped: list[dict], count: int) -> list[str]:
    """The issue's query and two neighbouring words of seeded-random titles (what a curator remembers)."""
    rng = random.Random(12)
    picked = ["Segmentation networks"]
    while len(picked) < count:
        words = [w.strip(":,.()") for w in rng.choice(shipped)["title"].split() if len(w.strip(":,.()")) > 3]
        if len(words) >= 2:
            start = rng.randrange(len(words) - 1)
            picked.append(" ".join(words[start : start + 2]))
    return picked


def fill(rows: int, shipped: list[dict]) -> None:
    start = datetime(2026, 1, 1)
    for first in range(0, rows, 1000):
        batch = [
            {
                "title": shipped[n % len(shipped)]["title"],
                "abstract": shipped[n % len(shipped)]["abstract"],
                "text_sha256": f"{n:064d}",
                "source": "batch",
                "created_at": start + timedelta(seconds=n),
            }
            for n in range(first, min(rows, first + 1000))
        ]
        db.session.execute(insert(Prediction), batch)
        db.session.commit()


def history_page(narrow: Callable[[Select, str], Select], query: str) -> int:
    """What /history asks for a search: the count and the first page. Returns the count."""
    stmt = narrow(select(Prediction).order_by(Prediction.created_at.desc(), Prediction.id.desc()), query)
    total = db.session.execute(select(func.count()).select_from(stmt.order_by(None).subquery())).scalar_one()
    db.session.scalars(stmt.limit(PAGE)).all()
    return total


def run(database_url: str, data_dir: Path, args: argparse.Namespace) -> None:
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench-secret-long-enough-for-production",
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url,
            "DEFAULT_BUNDLES_DIR": str(data_dir / "none"),
        }
    )
    shipped = papers()
    methods = {"full-text": search.matching, "LIKE": search.like_matching}
    times: dict[str, list[float]] = {name: [] for name in methods}
    found: dict[str, int] = dict.fromkeys(methods, 0)
    try:
        with app.app_context():
            flask_migrate.upgrade()
            started = time.perf_counter()
            fill(args.rows, shipped)
            print(
                f"{db.engine.dialect.name}: stored and indexed {args.rows} predictions in "
                f"{time.perf_counter() - started:.1f} s"
            )
            picked = queries(shipped, args.queries)
            for round_ in range(args.rounds):
                for i, query in enumerate(picked):
                    order = list(methods) if (i + round_) % 2 == 0 else list(reversed(methods))
                    for name in order:
                        started = time.perf_counter()
                        total = history_page(methods[name], query)
                        times[name].append(time.perf_counter() - started)
                        if round_ == 0 and total:
                            found[name] += 1
            db.session.remove()
    finally:
        with app.app_context():
            live_models().stop()
            db.engine.dispose()
        app.extensions[BATCH_WORKER].stop()
    p50 = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, t in times.items():
        p95 = statistics.quantiles(t, n=20)[-1] * 1000
        print(
            f"  {name:9s} p50 {p50[name]:8.2f} ms  p95 {p95:8.2f} ms  finds something for "
            f"{found[name]}/{len(picked)} queries"
        )
    print(f"  ratio full-text/LIKE p50: {p50['full-text'] / p50['LIKE']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default="", help="a PostgreSQL server URL: the bench makes its own database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        if not args.postgres:
            run("", data_dir, args)  # "": SQLite in the data dir
            return
        import psycopg
        from psycopg import sql

        server = make_url(args.postgres)
        name = f"papertag_bench_search_{int(time.time())}"
        admin = server.render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            run(server.set(database=name).render_as_string(hide_password=False), data_dir, args)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
