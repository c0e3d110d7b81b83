"""Bytes one stored (prediction, taxonomy) adds to the database, indexes included (issue 13 point 1: <= 2,000): the
storage of migration 0011 (every label's score and the version's thresholds as JSON in each result, a float32
embedding per result) against today's (``webapp/serving/stored.py``: float32 scores in label order, thresholds once
per version, an int8 embedding per prediction and encoder), each filled into a fresh database.

Both shipped taxonomies (``models/research-tasks``, ``models/arxiv-categories``: their labels, thresholds and real
answers) over real abstracts (``/work/shared/data``, else ``tests/fixtures/abstracts.jsonl``): the shipped models
answer the first ``--scored`` abstracts for real and their answers are recycled over the rest (the labels they decide
fill ``predicted_labels``). Each paper is one prediction with one result per taxonomy, written as the storage form
of its database writes them (prediction, results, predicted labels, embedding), in chunks through SQLAlchemy Core.

Growth is the database's used bytes after the fill minus before it (the schema and the two versions), divided by
predictions x taxonomies: SQLite pages in use (free pages left out), PostgreSQL's total relation sizes (tables,
TOAST, indexes). It also prints where the bytes went, table by table with their indexes.

    python bench/storage.py [--predictions 2000] [--scored 64] [--database-url postgresql://...]

``fill()`` and ``model_answers()`` are meant for reuse (``bench/scale.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from flask import Flask  # noqa: E402
from sqlalchemy import (  # noqa: E402
    JSON,
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    insert,
    text,
)
from sqlalchemy.engine import make_url  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import (  # noqa: E402
    Embedding,
    ModelArtifact,
    ModelVersion,
    PredictedLabel,
    Prediction,
    PredictionResult,
    Taxonomy,
    version_layout,
)
from webapp.serving.bundle import compose_text, read_manifest  # noqa: E402
from webapp.serving.inference import LoadedModel, score_all  # noqa: E402
from webapp.serving.stored import pack_embedding, rounded  # noqa: E402

SHIPPED = [REPO / "models" / "research-tasks", REPO / "models" / "arxiv-categories"]
DATA_FILES = [
    Path("/work/shared/data/pwc-tasks/papers.jsonl.gz"),
    Path("/work/shared/data/arxiv-categories/papers.jsonl.gz"),
]
FIXTURES = REPO / "tests" / "fixtures" / "abstracts.jsonl"
FORMS = ("0011", "now")
# The revision whose storage form "0011" is.
OLD_REVISION = "0011_current_labels"
CHUNK = 500
# Prediction i of a fill is made this many seconds after FILL_START.
FILL_START = datetime(2026, 1, 1)

# prediction_results as migration 0011 left it (the app's model follows today's schema).
OLD_RESULTS = Table(
    "prediction_results",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("prediction_id", Integer),
    Column("taxonomy_id", Integer),
    Column("model_version_id", String),
    Column("scores", JSON),
    Column("labels", JSON),
    Column("thresholds", JSON),
    Column("margin", Float),
    Column("embedding", LargeBinary),
    Column("best_guess", Boolean),
    Column("domain", Float),
    Column("off_domain", Boolean),
    Column("read_tokens", Integer),
    Column("total_tokens", Integer),
)


@dataclass(frozen=True)
class Bundle:
    """A shipped bundle's taxonomy, labels and thresholds, and the version id the fill stores it under."""

    path: Path
    slug: str
    name: str
    labels: list[str]
    thresholds: np.ndarray  # float32, as the scorer compares and stores them

    @property
    def version_id(self) -> str:
        """As long as a real one (slug, then 10 hex digits of the archive's sha256)."""
        return f"{self.slug}-{hashlib.sha256(self.slug.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Answer:
    """One taxonomy's real answer for one abstract, as the scorer stores it."""

    probabilities: np.ndarray
    embedding: np.ndarray
    labels: list[str]
    best_guess: bool
    off_domain: bool
    domain: float
    read_tokens: int
    total_tokens: int


def shipped_bundles(paths: Sequence[Path] = SHIPPED) -> list[Bundle]:
    bundles = []
    for path in paths:
        manifest = read_manifest(path)
        thresholds = np.asarray(manifest.thresholds, dtype=np.float32)
        bundles.append(Bundle(path, manifest.taxonomy_slug, manifest.taxonomy_name, list(manifest.labels), thresholds))
    return bundles


def read_papers(n: int) -> list[dict]:
    """``n`` distinct real papers (title, abstract): the shared data files in turn, else the test fixtures
    (repeated with a number in the title when there are fewer)."""
    papers: list[dict] = []
    for path in DATA_FILES:
        if path.exists():
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                for line in lines:
                    if len(papers) == n:
                        return papers
                    papers.append(json.loads(line))
    fixtures = [json.loads(line) for line in FIXTURES.read_text(encoding="utf-8").splitlines() if line.strip()]
    while len(papers) < n:
        paper = fixtures[len(papers) % len(fixtures)]
        papers.append({**paper, "title": f"{paper['title']} ({len(papers)})"})
    return papers


def load_models(bundles: Sequence[Bundle]) -> dict[str, LoadedModel]:
    """Slug -> the bundle loaded for scoring (on every core: nothing else runs meanwhile)."""
    return {bundle.slug: LoadedModel(bundle.path, threads=os.cpu_count() or 1) for bundle in bundles}


def model_answers(
    bundles: Sequence[Bundle], papers: Sequence[dict], models: dict[str, LoadedModel] | None = None
) -> list[dict[str, Answer]]:
    """What the shipped models (``models``, else loaded here) answer for each paper (one encoder pass for all of
    them, as the server runs them)."""
    models = models or load_models(bundles)
    texts = [compose_text(p.get("title"), p["abstract"]) for p in papers]
    scored = score_all(models, texts)
    answers: list[dict[str, Answer]] = [{} for _ in texts]
    for slug, outputs in scored.items():
        for i, out in enumerate(outputs):
            decision = models[slug].decide(out.probabilities, out.domain)
            answers[i][slug] = Answer(
                out.probabilities,
                out.embedding,
                decision.labels,
                decision.best_guess,
                decision.off_domain,
                out.domain,
                out.read_tokens,
                out.total_tokens,
            )
    return answers


def add_versions(connection: Connection, bundles: Sequence[Bundle]) -> dict[str, int]:
    """A taxonomy and a version per bundle (a stand-in artifact: the model's bytes are not what is measured).
    Returns slug -> taxonomy id. These tables are the same in both storage forms."""
    ids = {}
    for bundle in bundles:
        ids[bundle.slug] = connection.execute(
            insert(Taxonomy).values(slug=bundle.slug, name=bundle.name).returning(Taxonomy.id)
        ).scalar_one()
        sha = hashlib.sha256(bundle.version_id.encode()).hexdigest()
        connection.execute(insert(ModelArtifact).values(sha256=sha, data=b"bench", size=5))
        connection.execute(
            insert(ModelVersion).values(
                id=bundle.version_id,
                taxonomy_id=ids[bundle.slug],
                artifact_sha256=sha,
                labels=bundle.labels,
                thresholds=[float(t) for t in bundle.thresholds],
                manifest={},
            )
        )
    return ids


def _chunks(first: int, n: int) -> Iterator[range]:
    for start in range(first, first + n, CHUNK):
        yield range(start, min(first + n, start + CHUNK))


def fill(
    connection: Connection,
    form: str,
    bundles: Sequence[Bundle],
    taxonomy_ids: dict[str, int],
    papers: Sequence[dict],
    answers: Sequence[dict[str, Answer]],
    n: int,
    first: int = 0,
) -> None:
    """``n`` predictions numbered ``first``, ``first + 1``, ... (paper and answers ``i % len(...)``, a distinct text
    each), one result per bundle, written as storage ``form`` ("0011" or "now") writes them. Commits per chunk. "now"
    needs an app context (the versions' layouts). A later call with ``first`` = the count so far grows the history."""
    for chunk in _chunks(first, n):
        rows = []
        for i in chunk:
            paper = papers[i % len(papers)]
            title = paper.get("title") or None
            rows.append(
                {
                    "title": title,
                    "abstract": paper["abstract"],
                    "text_sha256": hashlib.sha256(f"{i} {title} {paper['abstract']}".encode()).hexdigest(),
                    "source": "batch",
                    "created_at": FILL_START + timedelta(seconds=i),
                }
            )
        ids = connection.scalars(insert(Prediction).returning(Prediction.id, sort_by_parameter_order=True), rows).all()
        results, labels, vectors = [], [], []
        for i, prediction_id in zip(chunk, ids, strict=True):
            answer_set = answers[i % len(answers)]
            shared: dict[bytes, int] = {}
            for bundle in bundles:
                answer = answer_set[bundle.slug]
                row = {
                    "prediction_id": prediction_id,
                    "taxonomy_id": taxonomy_ids[bundle.slug],
                    "model_version_id": bundle.version_id,
                    "labels": answer.labels,
                    "margin": float(np.min(np.abs(answer.probabilities - bundle.thresholds))),
                    "best_guess": answer.best_guess,
                    "domain": round(answer.domain, 6),
                    "off_domain": answer.off_domain,
                    "read_tokens": answer.read_tokens,
                    "total_tokens": answer.total_tokens,
                }
                scores = dict(zip(bundle.labels, rounded(answer.probabilities).tolist(), strict=True))
                thresholds = dict(zip(bundle.labels, rounded(bundle.thresholds).tolist(), strict=True))
                if form == "0011":
                    row |= {
                        "scores": scores,
                        "thresholds": thresholds,
                        "embedding": answer.embedding.astype("<f4").tobytes(),
                    }
                else:
                    packed = version_layout(bundle.version_id).pack(scores, thresholds)
                    row |= packed._asdict()
                    vector = pack_embedding(answer.embedding)
                    if vector not in shared:
                        shared[vector] = len(vectors)
                        vectors.append({"vector": vector})
                    row["embedding_id"] = shared[vector]  # an index into vectors until they are inserted
                results.append(row)
        if vectors:
            embedding_ids = connection.scalars(
                insert(Embedding).returning(Embedding.id, sort_by_parameter_order=True), vectors
            ).all()
            for row in results:
                row["embedding_id"] = embedding_ids[row["embedding_id"]]
        target = OLD_RESULTS if form == "0011" else PredictionResult.__table__
        result_ids = connection.scalars(insert(target).returning(target.c.id, sort_by_parameter_order=True), results)
        for row, result_id in zip(results, result_ids.all(), strict=True):
            owner = {"result_id": result_id, "prediction_id": row["prediction_id"]}
            if form != "0011":  # the taxonomy beside the label: migration 0021
                owner["taxonomy_id"] = row["taxonomy_id"]
            labels += [owner | {"label": label} for label in row["labels"]]
        if labels:
            connection.execute(insert(PredictedLabel), labels)
        connection.commit()


def used_bytes(connection: Connection) -> int:
    """Bytes the database's tables and indexes occupy now."""
    if connection.dialect.name == "sqlite":
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = connection.execute(text("PRAGMA page_count")).scalar_one()
        free = connection.execute(text("PRAGMA freelist_count")).scalar_one()
        return (pages - free) * connection.execute(text("PRAGMA page_size")).scalar_one()
    return connection.execute(
        text(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = current_schema()"
        )
    ).scalar_one()


def table_sizes(connection: Connection) -> dict[str, int]:
    """Table -> bytes of its pages and its indexes' (PostgreSQL: with its TOAST; SQLite: FTS5 shadow tables under
    their virtual table)."""
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname = current_schema()"
            )
        )
        return {name: size for name, size in rows}
    owner = {name: of for name, of in connection.execute(text("SELECT name, tbl_name FROM sqlite_master"))}
    sizes: dict[str, int] = {}
    for name, size in connection.execute(text("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")):
        table_name = owner.get(name, name)
        if table_name.startswith("predictions_fts"):
            table_name = "predictions_fts"
        sizes[table_name] = sizes.get(table_name, 0) + size
    return sizes


@dataclass
class Measured:
    form: str
    page_size: int | None  # SQLite's; None on PostgreSQL
    dialect: str
    predictions: int
    taxonomies: int
    grown: int
    seconds: float
    tables: dict[str, int]  # table -> bytes it grew by

    @property
    def name(self) -> str:
        return f"{self.form}, {self.page_size // 1024} KiB pages" if self.page_size else self.form

    @property
    def per_result(self) -> float:
        """Bytes per stored (prediction, taxonomy)."""
        return self.grown / (self.predictions * self.taxonomies)


def bench_app(data_dir: Path, database_url: str) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "bench-secret-long-enough-for-production",
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": database_url,
            "DEFAULT_BUNDLES_DIR": str(data_dir / "none"),
        }
    )


def measure(
    form: str,
    database_url: str,
    bundles: list[Bundle],
    papers: list[dict],
    answers: list,
    n: int,
    page_size: int | None = None,
) -> Measured:
    """A fresh database at ``form``'s revision (on SQLite with ``page_size`` if given, else the app's), filled with
    ``n`` predictions; its growth."""
    with tempfile.TemporaryDirectory(prefix="papertag-bench-storage-") as tmp:
        app = bench_app(Path(tmp), database_url)
        path = make_url(app.config["SQLALCHEMY_DATABASE_URI"]).database
        if page_size and not database_url and path:
            with contextlib.closing(sqlite3.connect(path)) as made:  # the size sticks once the database is WAL
                made.execute(f"PRAGMA page_size={int(page_size)}")
                made.execute("PRAGMA journal_mode=WAL")
        with app.app_context():
            with contextlib.redirect_stderr(io.StringIO()):  # alembic logs every revision
                flask_migrate.upgrade(revision=OLD_REVISION if form == "0011" else "head")
            with db.engine.connect() as connection:
                ids = add_versions(connection, bundles)
                connection.commit()
                before, tables_before = used_bytes(connection), table_sizes(connection)
                started = time.perf_counter()
                fill(connection, form, bundles, ids, papers, answers, n)
                seconds = time.perf_counter() - started
                if connection.dialect.name == "postgresql":
                    connection.execute(text("ANALYZE"))
                grown = used_bytes(connection) - before
                tables = {t: size - tables_before.get(t, 0) for t, size in table_sizes(connection).items()}
                dialect = connection.dialect.name
                size = connection.execute(text("PRAGMA page_size")).scalar_one() if dialect == "sqlite" else None
            db.engine.dispose()
    return Measured(form, size, dialect, n, len(bundles), grown, seconds, tables)


def fresh_postgres(server_url: str) -> tuple[str, str]:
    """A new database on the server: (its URL, the server's admin URL)."""
    import psycopg
    from psycopg import sql

    server = make_url(server_url)
    name = f"papertag_bench_storage_{os.getpid()}_{time.time_ns()}"
    admin = server.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.set(database=name).render_as_string(hide_password=False), admin


def drop_postgres(url: str, admin: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin, autocommit=True) as conn:
        name = make_url(url).database
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def report(runs: list[Measured]) -> None:
    """Bytes per stored (prediction, taxonomy) of each run, its ratio to the first, and table by table."""
    first = runs[0]
    print(
        f"{first.dialect}: {first.predictions} predictions x {first.taxonomies} taxonomies; bytes per stored "
        f"(prediction, taxonomy), indexes included:"
    )
    width = max(len(m.name) for m in runs)
    for m in runs:
        ratio = m.per_result / first.per_result
        print(f"  {m.name:{width}s} {m.per_result:8.0f}  {ratio:6.3f}x  (filled in {m.seconds:.1f} s)")
    units = first.predictions * first.taxonomies
    names = sorted({t for m in runs for t in m.tables}, key=lambda t: -first.tables.get(t, 0))
    print("  growth per table with its indexes: " + " | ".join(m.name for m in runs))
    for name in names:
        sizes = [m.tables.get(name, 0) / units for m in runs]
        if max(sizes) >= 1:
            print(f"    {name:24s}" + "".join(f"{size:9.0f}" for size in sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=2000)
    parser.add_argument("--scored", type=int, default=64, help="abstracts the shipped models answer for real")
    parser.add_argument("--database-url", default=os.environ.get("TEST_DATABASE_URL", ""), help="a PostgreSQL server")
    args = parser.parse_args()
    print("load average at start:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    bundles = shipped_bundles()
    papers = read_papers(args.predictions)
    answers = model_answers(bundles, papers[: args.scored])
    # 0011 as main made databases (4 KiB pages); today's form in an upgraded (then vacuumed) database of 4 KiB pages,
    # and in a new one (the app's 16 KiB pages).
    sqlite = [("0011", 4096), ("now", 4096), ("now", None)]
    report([measure(form, "", bundles, papers, answers, args.predictions, size) for form, size in sqlite])
    if args.database_url:
        runs = []
        for form in FORMS:
            url, admin = fresh_postgres(args.database_url)
            try:
                runs.append(measure(form, url, bundles, papers, answers, args.predictions))
            finally:
                drop_postgres(url, admin)
        report(runs)
    print("load average at end:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
