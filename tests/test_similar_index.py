"""Similar papers' vector index (``webapp/evidence/similar_index.py``):
the engine follows the database (sqlite-vec, pgvector
where the server has it, else the exact scan), the index holds exactly the stored embeddings a result points at, once
whatever the number of taxonomies sharing the encoder (new ones at once, none of a rolled-back or deleted one), the
exact scan finds what the index finds, copies of the query's text beyond the first candidates do not hide other
papers, an old version sparse among newer ones in its space is still answered in full, sqlite-vec's shards give the
nearest codes of the whole space, and migrations 0013, 0015 and 0019 index a database's existing results (and their
downgrades go back)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import flask_migrate
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import StaticPool

from tests.conftest import BundleFactory, live_models_of, make_app
from tests.test_similar import SLUG, predict, similar
from webapp.evidence import similar as similar_module
from webapp.evidence import similar_index
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import Embedding, PredictionResult
from webapp.serving.registry import activate, import_bundle
from webapp.serving.scoring import Submission, predict_and_store

# Set by make test's pgvector pass: its server must have pgvector (a server without it would test the exact scan
# again and pass).
PGVECTOR_REQUIRED = os.environ.get("TEST_PGVECTOR") == "required"


def index_tables(app: Flask) -> list[str]:
    """The tables of the index (every width), from the database's catalogue."""
    with app.app_context():
        connection = db.session.connection()
        if connection.dialect.name == "sqlite":
            query = (
                "SELECT name FROM sqlite_master WHERE name GLOB 'similar_space_codes_*' AND sql LIKE 'CREATE VIRTUAL%'"
            )
        else:
            query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'similar%'"
        return sorted(connection.execute(text(query)).scalars())


def indexed(app: Flask) -> set[int]:
    """Embedding ids the index holds."""
    with app.app_context():
        connection = db.session.connection()
        column = "rowid" if connection.dialect.name == "sqlite" else "embedding_id"
        return {
            i
            for table in index_tables(app)
            for i in connection.execute(text(f"SELECT {column} FROM {table}")).scalars()
        }


def column_type(app: Flask, table: str) -> str:
    """The type of a pgvector table's embedding column, from the catalogue (``halfvec(384)``)."""
    with app.app_context():
        return db.session.execute(
            text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass(:t) AND attname = 'embedding'"
            ),
            {"t": table},
        ).scalar_one()


def with_embeddings(app: Flask) -> set[int]:
    """Ids of the embeddings stored results point at."""
    with app.app_context():
        return set(
            db.session.scalars(select(PredictionResult.embedding_id).where(PredictionResult.embedding_id.is_not(None)))
        )


def expected_engine(app: Flask) -> type[similar_index.IndexEngine]:
    with app.app_context():
        connection = db.session.connection()
        if connection.dialect.name == "sqlite":
            return similar_index.SqliteVec
        if PGVECTOR_REQUIRED:
            return similar_index.PgVector
        offered = connection.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
        return similar_index.PgVector if offered else similar_index.ExactScan


def engine_of(app: Flask) -> similar_index.IndexEngine:
    with app.app_context():
        return similar_index.engine_for(db.session.connection())


def test_the_engine_follows_the_database_and_holds_every_stored_result(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    engine = engine_of(app)
    assert type(engine) is expected_engine(app)
    ids = predict(client, abstracts[:6])
    assert similar(client, ids[0])  # the index answers
    stored = with_embeddings(app)
    assert len(stored) == 6
    if isinstance(engine, similar_index.ExactScan):
        assert index_tables(app) == []  # nothing to keep in step: the scan reads the embeddings
    else:
        if isinstance(engine, similar_index.PgVector):
            # halfvec from pgvector 0.7 on (Render's), else vector: the tables are made with the engine's type.
            assert {column_type(app, t).split("(")[0] for t in index_tables(app)} == {engine.type}
            if PGVECTOR_REQUIRED:
                assert engine.type == "halfvec"
        assert indexed(app) == stored
        # A prediction stored after the first query is in the index at once.
        (newer,) = predict(client, abstracts[6:7])
        assert indexed(app) == with_embeddings(app) and newer in [row["id"] for row in similar(client, ids[0], k=50)]


def test_a_rolled_back_or_deleted_embedding_leaves_the_index(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    ids = predict(client, abstracts[:4])
    before = indexed(app)
    with app.app_context():
        predict_and_store([Submission(abstracts[5]["title"], abstracts[5]["abstract"])], "api", commit=False)
        db.session.rollback()
    assert indexed(app) == before
    assert len(similar(client, ids[0], k=50)) == 3
    with app.app_context():  # a result gone: its embedding's index row is passed over
        gone = db.session.scalars(select(PredictionResult).where(PredictionResult.prediction_id == ids[1])).one()
        embedding = gone.embedding
        db.session.delete(gone)
        db.session.commit()
    assert {row["id"] for row in similar(client, ids[0], k=50)} == {ids[2], ids[3]}
    with app.app_context():
        embedding_id = db.session.merge(embedding).id
        db.session.delete(db.session.get(Embedding, embedding_id))
        db.session.commit()
    if not isinstance(engine_of(app), similar_index.ExactScan):
        assert embedding_id not in indexed(app) and indexed(app) == with_embeddings(app)
    assert {row["id"] for row in similar(client, ids[0], k=50)} == {ids[2], ids[3]}


def test_taxonomies_sharing_an_encoder_share_one_index_row_per_abstract(
    app: Flask, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug="other-tasks", name="Other tasks"), actor="tests")
    live_models_of(app).refresh()
    client = app.test_client()
    ids = predict(client, abstracts[:8])
    with app.app_context():
        results = db.session.scalar(select(func.count()).select_from(PredictionResult))
    assert results == 16
    if not isinstance(engine_of(app), similar_index.ExactScan):
        assert len(indexed(app)) == 8 and indexed(app) == with_embeddings(app)
    body = client.get(f"/api/v1/predictions/{ids[0]}/similar?k=50").get_json()["results"]
    assert set(body) == {SLUG, "other-tasks"}
    for slug, answer in body.items():  # each taxonomy answers its own version's results, the same papers
        assert {row["id"] for row in answer["similar"]} == set(ids[1:]), slug


def test_an_old_version_sparse_in_its_space_is_answered_in_full(
    app: Flask, make_bundle: BundleFactory, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app.test_client()
    old = predict(client, abstracts[:3])
    with app.app_context():
        activate(import_bundle(make_bundle(seed=2), actor="tests").version.id)  # the same encoder: one space
    live_models_of(app).refresh()
    predict(client, abstracts[3:15])
    monkeypatch.setattr(similar_module, "MIN_CANDIDATES", 2)
    monkeypatch.setattr(similar_module, "CANDIDATES_PER_K", 1)
    monkeypatch.setattr(similar_index, "MAX_CANDIDATES", 4)
    # The space's 4 nearest embeddings may all be the newer version's; the old version's own vectors are scanned.
    assert {row["id"] for row in similar(client, old[0], k=2)} == set(old[1:])


def hnsw_indexes(app: Flask) -> list[str]:
    """The pgvector HNSW indexes the database holds."""
    with app.app_context():
        return sorted(
            db.session.execute(
                text("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexdef LIKE '%hnsw%'")
            ).scalars()
        )


def test_a_bulk_fill_indexes_every_stored_embedding_and_builds_a_new_index_after_its_rows(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    ids = predict(client, abstracts[:10])
    engine = engine_of(app)
    if isinstance(engine, similar_index.ExactScan):  # nothing to fill: the scan reads the embeddings
        with app.app_context():
            assert similar_index.add_stored(db.session.connection()) == max(with_embeddings(app))
        assert index_tables(app) == []
        return
    answers = [similar(client, i, k=5) for i in ids[:3]]
    if isinstance(engine, similar_index.PgVector):
        indexes = hnsw_indexes(app)
        assert len(indexes) == 1
    with app.app_context():  # as if the rows had been written outside the ORM: nothing indexed, no index
        for table in index_tables(app):
            db.session.execute(text(f"DROP TABLE {table}"))
        db.session.commit()
    similar_index.forget_engines()
    with app.app_context():
        connection = db.session.connection()
        highest = similar_index.add_stored(connection, chunk=3)  # several chunks before the index is built
        db.session.commit()
    assert highest == max(with_embeddings(app))
    assert indexed(app) == with_embeddings(app)
    if isinstance(engine, similar_index.PgVector):
        assert hnsw_indexes(app) == indexes  # the same index, built after the rows
    assert [similar(client, i, k=5) for i in ids[:3]] == answers
    # Later writes go into the rebuilt index at once, and a second fill adds only what is new.
    (newer,) = predict(client, abstracts[10:11])
    assert indexed(app) == with_embeddings(app) and newer in [row["id"] for row in similar(client, ids[0], k=50)]
    with app.app_context():
        assert similar_index.add_stored(db.session.connection(), after=highest + 1) == highest + 1
        db.session.commit()


@contextmanager
def exact_scan_on() -> Iterator[None]:
    """Every database uses the fallback meanwhile."""
    similar_index.FORCE_EXACT_SCAN = True
    similar_index.forget_engines()
    try:
        yield
    finally:
        similar_index.FORCE_EXACT_SCAN = False
        similar_index.forget_engines()


def test_the_exact_scan_finds_what_the_index_finds(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    ids = predict(client, abstracts[:12])
    indexed_answers = [similar(client, i, k=5) for i in ids[:3]]
    with exact_scan_on():
        assert isinstance(engine_of(app), similar_index.ExactScan)
        assert [similar(client, i, k=5) for i in ids[:3]] == indexed_answers


def test_copies_of_the_text_beyond_the_first_candidates_do_not_hide_other_papers(
    client: FlaskClient, abstracts: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, *copies = predict(client, [abstracts[0]] * 6)
    others = predict(client, abstracts[1:3])
    assert set(copies).isdisjoint(row["id"] for row in similar(client, first, k=2))
    monkeypatch.setattr(similar_module, "MIN_CANDIDATES", 1)
    monkeypatch.setattr(similar_module, "CANDIDATES_PER_K", 1)
    # The first candidates are the text's own copies (cosine 1); the search widens until two other papers are found.
    assert sorted(row["id"] for row in similar(client, first, k=2)) == sorted(others)


def test_migrations_index_existing_results_of_every_version(
    tmp_path: Path, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    app = make_app(tmp_path / "data")
    with app.app_context():
        import_bundle(make_bundle(seed=1), actor="tests")
    client = app.test_client()
    old = predict(client, abstracts[:5])
    with app.app_context():
        newer = import_bundle(make_bundle(seed=2), actor="tests").version.id
        activate(newer)
    live_models_of(app).refresh()
    new = predict(client, abstracts[5:10])
    answers = {i: similar(client, i, k=3) for i in (old[0], new[0])}
    live_models_of(app).stop()
    app.extensions[BATCH_WORKER].stop()
    engine = engine_of(app)
    indexed_before = indexed(app)
    with app.app_context():
        flask_migrate.downgrade(revision="0018_lexical_reading")  # 0015's layout on SQLite: no shards
        db.session.remove()
    if isinstance(engine, similar_index.SqliteVec):
        assert "shard" not in code_table_sql(app) and indexed(app) == indexed_before
    with app.app_context():
        flask_migrate.downgrade(revision="0014_batch_chunks")  # 0013's layout: a row per result, by version
        connection = db.session.connection()
        if not isinstance(engine, similar_index.ExactScan):
            old_layout = "similar_codes_32" if connection.dialect.name == "sqlite" else "similar_vectors_32"
            key = "rowid" if connection.dialect.name == "sqlite" else "result_id"
            rows = set(connection.execute(text(f"SELECT {key} FROM {old_layout}")).scalars())
            assert rows == set(db.session.scalars(select(PredictionResult.id)))
        db.session.remove()
        flask_migrate.downgrade(revision="0012_compact_storage")
    assert index_tables(app) == []
    with app.app_context():
        flask_migrate.upgrade()
    if isinstance(engine, similar_index.ExactScan):
        assert index_tables(app) == []
    else:
        assert indexed(app) == with_embeddings(app) and len(indexed(app)) == 10
    if isinstance(engine, similar_index.SqliteVec):
        assert "shard integer partition key" in code_table_sql(app)
        assert f"chunk_size={similar_index.CHUNK_SIZE}" in code_table_sql(app)
    assert {i: similar(client, i, k=3) for i in (old[0], new[0])} == answers
    assert {row["id"] for row in similar(client, old[0], k=50)} == set(old[1:])
    body = client.get(f"/api/v1/predictions/{new[0]}/similar?k=50").get_json()["results"][SLUG]
    assert body["model_version"] == newer and {row["id"] for row in body["similar"]} == set(new[1:])
    with app.app_context():
        db.engine.dispose()


def code_table_sql(app: Flask) -> str:
    """The statement that made the SQLite index's table (one code width in these tests)."""
    (table,) = index_tables(app)
    with app.app_context():
        return db.session.execute(text("SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table}).scalar_one()


def test_sqlite_vec_loads_on_a_plain_connection_and_leaves_loading_off() -> None:
    connection = sqlite3.connect(":memory:")
    similar_index.load_sqlite_vec(connection)
    assert connection.execute("SELECT vec_version()").fetchone() == ("v0.1.9",)
    with pytest.raises(sqlite3.OperationalError, match="not authorized"):
        connection.execute("SELECT load_extension('/nonexistent/library')")
    connection.close()


@pytest.mark.parametrize("first_share", [None, 1])
def test_sqlite_vec_shards_give_the_nearest_codes_of_the_whole_space(
    first_share: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The codes a search merges from the shards are the space's nearest by Hamming distance, also when a shard holds
    more of them than it was first asked for (a share of 1 makes most shards be asked again)."""
    engine = create_engine("sqlite://", poolclass=StaticPool)  # the app's connect hook loads sqlite-vec into it
    if first_share is not None:
        monkeypatch.setattr(similar_index.SqliteVec, "share", staticmethod(lambda k: first_share))
    rng = np.random.default_rng(7)
    vectors = rng.integers(-127, 128, size=(400, 64), dtype=np.int8)
    vectors[200:260] = vectors[0] // 2 + vectors[200:260] // 8  # a crowd near the query, in a few shards or all
    ids = [3 + 2000 * i for i in range(len(vectors))]  # spaced ids (rows written together) still spread
    index = similar_index.SqliteVec()
    with engine.begin() as connection:
        index.add(
            connection, [similar_index.IndexRow(i, "space:a", v.tobytes()) for i, v in zip(ids, vectors, strict=True)]
        )
        index.add(connection, [similar_index.IndexRow(1, "space:b", vectors[1].tobytes())])  # another space
        table = index.table(64)
        counts = dict(connection.execute(text(f"SELECT shard, count(*) FROM {table} GROUP BY shard")).all())
        assert set(counts) == set(range(similar_index.SHARDS))
        assert min(counts.values()) >= len(ids) / similar_index.SHARDS / 2
        code = similar_index.binary_code(vectors[0].tobytes())
        bits = np.unpackbits(np.packbits(vectors > 0, axis=1) ^ np.frombuffer(code, dtype=np.uint8), axis=1)
        distance = dict(zip(ids, bits.sum(axis=1).tolist(), strict=True))
        for k in (1, 5, 20, 64, 400, 500):
            nearest = index.nearest(connection, table, "space:a", code, k)
            assert len(nearest) == min(k, len(ids)) and set(nearest) <= set(ids)
            assert nearest == sorted(nearest, key=lambda i: (distance[i], i))
            assert [distance[i] for i in nearest] == sorted(distance.values())[: len(nearest)]
