"""The vector index behind similar papers (issue 13 point 3): which stored results lie nearest a result of the same
model version, with memory bounded per web worker whatever the history's size. One engine is chosen per database at
run time and logged once.

The index holds **embeddings, once per embedding space**, not results: the versions whose bundles share an encoder
(``encoder_sha256`` in the manifest: the shipped taxonomies, every head retrained on the frozen encoder) embed a
text alike, and their results point at one stored vector (``webapp/serving/stored.py``), so one index row and one
search serve them all (two taxonomies cost one search, not two). A version without an encoder digest is a space of
its own. A search takes the space's nearest embeddings and answers the version's results that point at them.

- **SQLite: sqlite-vec** (the ``sqlite-vec`` wheel, loaded on every connection by :func:`load_sqlite_vec`). Each
  embedding is indexed as its binary code, the sign bit of each int8 component (48 bytes for MiniLM's 384), in a
  ``vec0`` table per code width (``similar_space_codes_<bits>``) partitioned by space and by shard (:func:`shard_of`,
  migration 0019); a query takes the nearest codes by Hamming distance, shard by shard (:meth:`SqliteVec.nearest`),
  and :mod:`webapp.evidence.similar` ranks them by the exact cosine of their stored int8 vectors.
  Why shards: sqlite-vec 0.1.9 keeps a query's ``k`` nearest by a selection that costs ``k`` steps per code read
  (1.3 ms per unit of ``k`` at a million codes: k = 64 took 114 ms, k = 1 29 ms), so ``SHARDS`` queries asking a
  share of ``k`` each read every code once at a fraction of the selection (k = 64: 48 ms with ``CHUNK_SIZE``),
  and a shard that may hold more of the nearest than its share is asked again, so the merged ``k`` are the nearest
  codes of the whole space (``bench/similar_scale.py``, README "Similar papers").
  Why codes and not ``int8[384]`` rows: sqlite-vec 0.1.9 has flat (brute-force) tables only, and at a million rows
  its int8 cosine scan took 1.2 s a query on the 2-core box (shared, load ~2), a ``vec_distance_cosine`` scan of the
  ``embeddings`` table as long, the Hamming scan of codes 50-60 ms (``bench/similar_scale.py`` measures whole
  requests); codes also add ~80 bytes an embedding to the database where ``int8[384]`` rows would add ~420.
- **PostgreSQL with pgvector** (created by migration 0013 where ``pg_available_extensions`` offers it): each
  embedding as a ``halfvec`` (a ``vector`` before pgvector 0.7; int8 values are exact in both) in a table per width
  (``similar_space_vectors_<width>``), with an HNSW index (cosine) per space, queried with ``<=>``.
- **PostgreSQL without pgvector**: no index; a query streams the version's vectors in chunks and keeps the best
  (exact, memory bounded by the chunk; its time grows with the version's size). The other engines fall back to it
  for a version whose results are too sparse in its space for the index's nearest to hold enough of them.

Every engine answers *candidates*: result ids of the version, roughly nearest first, that :mod:`webapp.evidence.similar`
ranks exactly. The index is written where embeddings are (an ORM flush listener below; a bulk writer outside the ORM
calls :func:`add_stored`), so a new prediction is found at once; a deleted embedding leaves its index row too (a
deleted result's embedding stays while another result points at it, and a row no result of a version points at is
passed over).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import sqlite3
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from hashlib import sha256
from typing import Any, NamedTuple

import numpy as np
from flask import g, has_app_context
from sqlalchemy import event, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, UOWTransaction

from ..models import PredictionResult
from ..serving.stored import EMBEDDING_DTYPE

log = logging.getLogger(__name__)

# vec0 answers at most this many neighbours a query.
MAX_CANDIDATES = 4096
# Result ids read per query by the exact scan: ~4,096 rows of a version with two taxonomies (x 768 hex digits each for
# MiniLM), the most it holds at once.
SCAN_IDS = 8192
CODE_TABLE = "similar_space_codes_{bits}"
# sqlite-vec partitions of a space's codes: a query asks each for its share of the nearest (SqliteVec.nearest).
SHARD_BITS = 3
SHARDS = 1 << SHARD_BITS
# Codes per sqlite-vec chunk (its largest): a query reads a row per chunk of the table to find its partition's, so
# with shards fewer, larger chunks count (at a million: 1,024 a chunk 110 ms a search, 2,048 79 ms, 4,096 48 ms). A
# partition takes whole chunks: a space's 8 shards hold 1.8 MB before their first 32,768 codes.
CHUNK_SIZE = 4096
VECTOR_TABLE = "similar_space_vectors_{width}"
# Every table the index makes starts so (migrations/env.py keeps autogenerate off them; 0013's downgrade drops them).
TABLE_PREFIX = "similar_"


class IndexRow(NamedTuple):
    """One embedding to index: its id, its space (:func:`space_of`) and its vector (int8 bytes,
    ``webapp/serving/stored.py``)."""

    embedding_id: int
    space: str
    vector: bytes


class Candidates(NamedTuple):
    """What an engine proposes: result ids of the version, roughly nearest first; ``more``: the index holds more
    than it looked at (asking for more may find more)."""

    result_ids: list[int]
    more: bool


_spaces: dict[str, str] = {}
_spaces_lock = threading.Lock()


def space_of(connection: Connection, version_id: str) -> str:
    """The embedding space of a model version: its encoder's digest, else the version itself. Versions never change,
    so each process reads it once."""
    with _spaces_lock:
        known = _spaces.get(version_id)
    if known is None:
        manifest = connection.execute(
            text("SELECT manifest FROM model_versions WHERE id = :v"), {"v": version_id}
        ).scalar()
        if isinstance(manifest, str):  # SQLite hands JSON columns back as text through a plain text() query
            manifest = json.loads(manifest)
        digest = manifest.get("encoder_sha256") if isinstance(manifest, dict) else None
        known = f"encoder:{digest}" if isinstance(digest, str) and digest else f"version:{version_id}"
        with _spaces_lock:
            _spaces[version_id] = known
    return known


def _nearest_once(key: tuple, search: Callable[[], list[int]]) -> list[int]:
    """``search()``'s embedding ids, searched once per request: the taxonomies sharing a space ask the same."""
    if not has_app_context():
        return search()
    searched = g.setdefault("similar_searches", {})
    if key not in searched:
        searched[key] = search()
    return searched[key]


def _results_of(connection: Connection, version_id: str, embedding_ids: list[int]) -> list[int]:
    """The version's results that point at these embeddings, in the embeddings' order. The version is picked out
    here, not in SQL: a condition on it led SQLite to walk the version's index (every result of the version, 0.4 s
    at a million) instead of looking up the few embeddings (a handful of results each, one per taxonomy)."""
    if not embedding_ids:
        return []
    rows = connection.execute(
        select(PredictionResult.id, PredictionResult.embedding_id, PredictionResult.model_version_id).where(
            PredictionResult.embedding_id.in_(embedding_ids)
        )
    ).all()
    rank = {embedding_id: i for i, embedding_id in enumerate(embedding_ids)}
    mine = sorted((rank[row[1]], row[0]) for row in rows if row[2] == version_id)
    return [result_id for _, result_id in mine]


class SqliteVecMissing(RuntimeError):
    """sqlite-vec could not be loaded into a SQLite connection: similar papers could not keep their index."""


def _enable_load_extension(connection: sqlite3.Connection, on: bool) -> None:
    """Allow (or forbid again) loading extensions on ``connection``. Pythons built without
    ``--enable-loadable-sqlite-extensions`` (pyenv's default, this project's machines) lack the method; the same C call
    is made on the connection's ``sqlite3 *`` handle, which CPython keeps right after the object header."""
    if hasattr(connection, "enable_load_extension"):
        connection.enable_load_extension(on)
        return
    if sys.implementation.name != "cpython" or type(connection) is not sqlite3.Connection:
        raise SqliteVecMissing("this Python's sqlite3 cannot load extensions")
    import _sqlite3

    library = ctypes.CDLL(_sqlite3.__file__)  # its symbols include those of the SQLite it links
    library.sqlite3_enable_load_extension.argtypes = [ctypes.c_void_p, ctypes.c_int]
    handle = ctypes.c_void_p.from_address(id(connection) + object.__basicsize__).value
    if library.sqlite3_enable_load_extension(handle, int(on)) != 0:
        raise SqliteVecMissing("SQLite refused to enable extension loading")


def load_sqlite_vec(connection: sqlite3.Connection) -> None:
    """Load sqlite-vec into a new SQLite connection (every connection: the index is written on each); extension
    loading is switched off again afterwards, so SQL cannot load other libraries."""
    try:
        import sqlite_vec

        _enable_load_extension(connection, True)
        try:
            connection.execute("SELECT load_extension(?)", (sqlite_vec.loadable_path(),))
        finally:
            _enable_load_extension(connection, False)
    except (ImportError, sqlite3.Error, OSError, AttributeError) as exc:
        raise SqliteVecMissing(
            f"sqlite-vec could not be loaded ({exc}); similar papers need it on SQLite: pip install -r requirements.txt"
        ) from exc


def shard_of(embedding_id: int) -> int:
    """The sqlite-vec shard of an embedding: the top ``SHARD_BITS`` of Knuth's multiplicative hash of its id (its low
    bits would follow the id's, and ids written together, copies of one text, would share a shard). Migration 0019
    computes the same in SQL."""
    return ((embedding_id * 2654435761) % 2**32) >> (32 - SHARD_BITS)


def binary_code(vector: bytes) -> bytes:
    """A stored int8 vector's binary code: bit i is set where component i is positive, 8 to a byte (the last one padded
    with zeros). The Hamming distance of two codes grows with the angle between the vectors."""
    return np.packbits(np.frombuffer(vector, dtype=EMBEDDING_DTYPE) > 0).tobytes()


def _pgvector_literal(vector: bytes) -> str:
    return "[" + ",".join(map(str, np.frombuffer(vector, dtype=EMBEDDING_DTYPE).tolist())) + "]"


def _quoted(value: str) -> str:
    """``value`` as an SQL string literal (a partial index's predicate cannot be a bound parameter)."""
    return "'" + value.replace("'", "''") + "'"


class IndexEngine:
    """How one database indexes and searches results' vectors."""

    name = ""

    def add(self, connection: Connection, rows: Sequence[IndexRow]) -> None:
        """Index ``rows`` (embeddings not indexed yet) in ``connection``'s transaction."""

    def add_many(self, connection: Connection, chunks: Iterable[Sequence[IndexRow]]) -> None:
        """Index a bulk writer's rows, chunk by chunk, in ``connection``'s transaction."""
        for rows in chunks:
            self.add(connection, rows)

    def remove(self, connection: Connection, embedding_ids: Sequence[int]) -> None:
        """Forget these embeddings."""

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> Candidates:
        """Result ids of ``version_id`` among the ``n`` embeddings of its space nearest ``vector`` (``vector`` among
        them if stored), roughly nearest first."""
        raise NotImplementedError


class SqliteVec(IndexEngine):
    """Binary codes in sqlite-vec ``vec0`` tables, one per code width, partitioned by space and shard; rowid = embedding
    id."""

    name = "sqlite-vec"

    @staticmethod
    def table(bits: int) -> str:
        return CODE_TABLE.format(bits=bits)

    @staticmethod
    def share(k: int) -> int:
        """How many of the ``k`` nearest a shard is first asked for: twice its even share and a margin, so a shard
        rarely holds more of them (then it is asked again)."""
        return min(k, math.ceil(2 * k / SHARDS) + 4)

    def add(self, connection: Connection, rows: Sequence[IndexRow]) -> None:
        by_width: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            code = binary_code(row.vector)
            by_width.setdefault(8 * len(code), []).append(
                {"id": row.embedding_id, "space": row.space, "shard": shard_of(row.embedding_id), "code": code}
            )
        for bits, values in by_width.items():
            table = self.table(bits)
            # In the writer's transaction: SQLite has one writer at a time, and another connection would wait on it.
            connection.execute(
                text(
                    f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING vec0(space text partition key, "
                    f"shard integer partition key, code bit[{bits}], chunk_size={CHUNK_SIZE})"
                )
            )
            connection.execute(
                text(f"INSERT INTO {table} (rowid, space, shard, code) VALUES (:id, :space, :shard, vec_bit(:code))"),
                values,
            )

    def remove(self, connection: Connection, embedding_ids: Sequence[int]) -> None:
        for (table,) in connection.execute(
            text(
                "SELECT name FROM sqlite_master WHERE name GLOB 'similar_space_codes_*' AND sql LIKE 'CREATE VIRTUAL%'"
            )
        ):
            connection.execute(text(f"DELETE FROM {table} WHERE rowid = :id"), [{"id": i} for i in embedding_ids])

    def nearest(self, connection: Connection, table: str, space: str, code: bytes, k: int) -> list[int]:
        """Ids of the ``k`` codes of ``space`` nearest ``code`` by Hamming distance, nearest first (equal distances
        by id): each shard's :meth:`share`, merged; a shard that gave all it was asked and whose farthest is nearer
        than the merged ``k``-th may hold more of them, and is asked for ``k``."""
        if k < 1:
            return []
        query = text(
            f"SELECT rowid, distance FROM {table} WHERE code MATCH vec_bit(:code) AND k = :k AND space = :space "
            "AND shard = :shard ORDER BY distance"
        )

        def ask(shard: int, n: int) -> list[tuple[int, float]]:
            rows = connection.execute(query, {"code": code, "k": n, "space": space, "shard": shard})
            return [(row[0], row[1]) for row in rows]

        asked = dict.fromkeys(range(SHARDS), self.share(k))
        found = {shard: ask(shard, n) for shard, n in asked.items()}
        while True:
            merged = sorted((row for rows in found.values() for row in rows), key=lambda row: (row[1], row[0]))[:k]
            cutoff = merged[-1][1] if len(merged) == k else math.inf
            again = [s for s, rows in found.items() if asked[s] < k and len(rows) == asked[s] and rows[-1][1] < cutoff]
            if not again:
                return [rowid for rowid, _ in merged]
            for shard in again:
                asked[shard] = k
                found[shard] = ask(shard, k)

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> Candidates:
        code = binary_code(vector)
        table = self.table(8 * len(code))
        exists = connection.execute(text("SELECT 1 FROM sqlite_master WHERE name = :t"), {"t": table}).first()
        if exists is None:
            return Candidates([], more=False)
        k, space = min(n, MAX_CANDIDATES), space_of(connection, version_id)
        nearest = _nearest_once((table, space, code, k), lambda: self.nearest(connection, table, space, code, k))
        return Candidates(_results_of(connection, version_id, nearest), more=len(nearest) == k)


class PgVector(IndexEngine):
    """pgvector: a table of embeddings per width, an HNSW index (cosine) per space."""

    name = "pgvector"

    def __init__(self, extension_version: str) -> None:
        self.extension_version = extension_version
        parts = tuple(int(p) for p in extension_version.split(".")[:2] if p.isdigit())
        self.type = "halfvec" if parts >= (0, 7) else "vector"
        # table -> its column's type
        self._types: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def table(width: int) -> str:
        return VECTOR_TABLE.format(width=width)

    @staticmethod
    def index_name(table: str, space: str) -> str:
        return f"ix_{table}_{sha256(space.encode()).hexdigest()[:16]}"

    def ensure(self, connection: Connection, width: int, space: str) -> None:
        """The width's table and the space's HNSW index. Made on a connection of their own and committed at once:
        inside a writer's transaction, CREATE INDEX would hold a lock that two writers of a new version could
        deadlock on."""
        table = self.table(width)
        index = self.index_name(table, space)
        if self._exists(connection, index):
            return
        with connection.engine.connect() as ddl:
            try:
                self._create_table(ddl, width)
                self._create_index(ddl, width, space)
                ddl.commit()
            except Exception as exc:  # noqa: BLE001 - another worker made the same table or index meanwhile
                ddl.rollback()
                if not self._exists(ddl, index):
                    raise RuntimeError(f"could not create the similar-papers index {index}") from exc

    @staticmethod
    def _exists(connection: Connection, relation: str) -> bool:
        return connection.execute(text("SELECT to_regclass(:r)"), {"r": relation}).scalar() is not None

    def _create_table(self, connection: Connection, width: int) -> None:
        connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {self.table(width)} (embedding_id integer PRIMARY KEY, "
                f"space varchar(90) NOT NULL, embedding {self.type}({width}) NOT NULL)"
            )
        )

    def _create_index(self, connection: Connection, width: int, space: str) -> None:
        table = self.table(width)
        opclass = self.column_type(connection, table).split("(")[0] + "_cosine_ops"
        connection.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS {self.index_name(table, space)} ON {table} USING hnsw "
                f"(embedding {opclass}) WHERE space = {_quoted(space)}"
            )
        )

    def add_many(self, connection: Connection, chunks: Iterable[Sequence[IndexRow]]) -> None:
        """A space whose HNSW index does not exist yet gets its rows first and the index once after them, as
        pgvector advises for a bulk load (each row inserted into the graph made a fill of 100,000 take 529 s
        against 128 s without pgvector, README "Similar papers"). All in ``connection``'s transaction: a bulk writer
        (a fill, a restore) is alone on the database, so no second writer can wait on the index's lock."""
        deferred: dict[tuple[int, str], bool] = {}  # (width, space) -> its index waits for the end
        for rows in chunks:
            for width, space in {(len(row.vector), row.space) for row in rows} - deferred.keys():
                deferred[width, space] = not self._exists(connection, self.index_name(self.table(width), space))
                if deferred[width, space]:
                    self._create_table(connection, width)
            waiting = [deferred[len(row.vector), row.space] for row in rows]
            self._insert(connection, [row for row, wait in zip(rows, waiting, strict=True) if wait])
            self.add(connection, [row for row, wait in zip(rows, waiting, strict=True) if not wait])
        for width, space in sorted(key for key, wait in deferred.items() if wait):
            self._create_index(connection, width, space)

    def column_type(self, connection: Connection, table: str) -> str:
        """``halfvec(384)`` or ``vector(384)``: as the table was made (pgvector may have been upgraded since)."""
        with self._lock:
            known = self._types.get(table)
        if known is None:
            known = connection.execute(
                text(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = to_regclass(:t) AND attname = 'embedding'"
                ),
                {"t": table},
            ).scalar_one()
            with self._lock:
                self._types[table] = known
        return known

    def add(self, connection: Connection, rows: Sequence[IndexRow]) -> None:
        for width, space in {(len(row.vector), row.space) for row in rows}:
            self.ensure(connection, width, space)
        self._insert(connection, rows)

    def _insert(self, connection: Connection, rows: Sequence[IndexRow]) -> None:
        by_table: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            width = len(row.vector)
            by_table.setdefault(self.table(width), []).append(
                {"id": row.embedding_id, "space": row.space, "vector": _pgvector_literal(row.vector)}
            )
        for table, values in by_table.items():
            column_type = self.column_type(connection, table)
            connection.execute(
                text(
                    f"INSERT INTO {table} (embedding_id, space, embedding) "
                    f"VALUES (:id, :space, CAST(:vector AS {column_type}))"
                ),
                values,
            )

    def remove(self, connection: Connection, embedding_ids: Sequence[int]) -> None:
        tables = connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE :p"),
            {"p": VECTOR_TABLE.format(width="%")},
        ).scalars()
        for table in tables:
            connection.execute(
                text(f"DELETE FROM {table} WHERE embedding_id = ANY(:ids)"), {"ids": list(embedding_ids)}
            )

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> Candidates:
        table = self.table(len(vector))
        if connection.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None:
            return Candidates([], more=False)
        column_type = self.column_type(connection, table)
        # The space's partial index serves only a plan that knows the space: no generic plan. HNSW returns at most
        # ef_search rows (pgvector caps it at 1000).
        connection.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        connection.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, min(n, 1000))}"))
        space = space_of(connection, version_id)
        query = text(
            f"SELECT embedding_id FROM {table} WHERE space = :space "
            f"ORDER BY embedding <=> CAST(:vector AS {column_type}) LIMIT :n"
        )
        nearest = _nearest_once(
            (table, space, vector, n),
            lambda: list(
                connection.execute(query, {"space": space, "vector": _pgvector_literal(vector), "n": n}).scalars()
            ),
        )
        return Candidates(_results_of(connection, version_id, nearest), more=len(nearest) == n)


class ExactScan(IndexEngine):
    """No index (PostgreSQL without pgvector): the version's vectors read a range of ``SCAN_IDS`` result ids at a
    time, each range as one row (ids and hex vectors aggregated by the database, so Python handles no row one by
    one), the best ``n`` kept."""

    name = "exact scan"

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> Candidates:
        low, high = connection.execute(
            text("SELECT min(id), max(id) FROM prediction_results WHERE model_version_id = :version"),
            {"version": version_id},
        ).one()
        if low is None:
            return Candidates([], more=False)
        query = _directions(np.frombuffer(vector, dtype=EMBEDDING_DTYPE)[None, :])[0]
        # The vector by a subquery per row: a join let PostgreSQL's planner hash the whole embeddings table per range.
        rows = (
            "SELECT r.id AS id, (SELECT {hex} FROM embeddings e WHERE e.id = r.embedding_id) AS vector "
            "FROM prediction_results r WHERE r.model_version_id = :version AND r.id >= :low AND r.id < :high "
            "AND r.embedding_id IS NOT NULL"
        )
        if connection.dialect.name == "sqlite":
            rows = rows.format(hex="hex(e.vector)")
            chunk = text(f"SELECT group_concat(id), group_concat(vector, '') FROM ({rows} ORDER BY r.id)")
        else:
            rows = rows.format(hex="encode(e.vector, 'hex')")
            chunk = text(
                f"SELECT string_agg(id::text, ',' ORDER BY id), string_agg(vector, '' ORDER BY id) FROM ({rows}) c"
            )
        best_ids = np.zeros(0, dtype=np.int64)
        best = np.zeros(0, dtype=np.float32)
        for start in range(low, high + 1, SCAN_IDS):
            ids_text, vectors_hex = connection.execute(
                chunk, {"version": version_id, "low": start, "high": start + SCAN_IDS}
            ).one()
            if not ids_text:
                continue
            matrix = np.frombuffer(bytes.fromhex(vectors_hex), dtype=EMBEDDING_DTYPE).reshape(-1, len(vector))
            best_ids = np.concatenate([best_ids, np.array(ids_text.split(","), dtype=np.int64)])
            best = np.concatenate([best, _directions(matrix) @ query])
            if len(best) > n:
                top = np.argpartition(-best, n - 1)[:n]
                best_ids, best = best_ids[top], best[top]
        order = np.lexsort((best_ids, -best))
        return Candidates(best_ids[order].tolist(), more=len(best_ids) == n)


def cosines(vectors: Sequence[bytes], query: bytes) -> np.ndarray:
    """The cosine similarity of each stored int8 vector (all of ``query``'s width) with ``query``, as float32."""
    matrix = np.frombuffer(b"".join(vectors), dtype=EMBEDDING_DTYPE).reshape(len(vectors), len(query))
    return _directions(matrix) @ _directions(np.frombuffer(query, dtype=EMBEDDING_DTYPE)[None, :])[0]


def _directions(matrix: np.ndarray) -> np.ndarray:
    """Rows of int8 vectors as unit float32 vectors (a zero row stays zero)."""
    values = matrix.astype(np.float32)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.where(norms > 0, norms, 1)


_chosen: weakref.WeakKeyDictionary[Engine, IndexEngine] = weakref.WeakKeyDictionary()
_chosen_lock = threading.Lock()
# Tests set it (then call forget_engines) to run the fallback where an index exists.
FORCE_EXACT_SCAN = False


def _pgvector_version(connection: Connection) -> str | None:
    return connection.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()


def engine_for(connection: Connection) -> IndexEngine:
    """The index engine of ``connection``'s database, chosen once per SQLAlchemy engine and logged."""
    with _chosen_lock:
        chosen = _chosen.get(connection.engine)
    if chosen is not None:
        return chosen
    engine: IndexEngine
    if FORCE_EXACT_SCAN:
        engine = ExactScan()
    elif connection.dialect.name == "sqlite":
        engine = SqliteVec()
        log.info("similar papers: sqlite-vec binary codes, ranked by exact cosine")
    else:
        version = _pgvector_version(connection)
        if version:
            engine = PgVector(version)
            log.info("similar papers: pgvector %s HNSW (cosine, %s)", version, engine.type)
        else:
            engine = ExactScan()
            log.warning("similar papers: pgvector is not installed in this database; exact scan (slow at scale)")
    with _chosen_lock:
        return _chosen.setdefault(connection.engine, engine)


def forget_engines() -> None:
    """Choose again on next use (tests that switch the fallback on or off)."""
    with _chosen_lock:
        _chosen.clear()


def add_stored(connection: Connection, after: int = 0, chunk: int = 2000) -> int:
    """Index every stored embedding that a result points at with an id above ``after`` (what a bulk writer stored
    outside the ORM: a benchmark's fill), ``chunk`` at a time in ``connection``'s transaction; returns the highest id
    seen (``after`` if none). Its space is that of the first version pointing at it (versions sharing an embedding
    share a space). ORM writes are indexed by the flush listener below."""
    highest = after

    def chunks() -> Iterator[list[IndexRow]]:
        nonlocal highest
        while True:
            rows = connection.execute(
                text(
                    "SELECT e.id, (SELECT r.model_version_id FROM prediction_results r WHERE r.embedding_id = e.id "
                    "ORDER BY r.id LIMIT 1) AS version, e.vector FROM embeddings e WHERE e.id > :after "
                    "ORDER BY e.id LIMIT :n"
                ),
                {"after": highest, "n": chunk},
            ).all()
            if not rows:
                return
            highest = rows[-1][0]
            yield [IndexRow(row[0], space_of(connection, row[1]), bytes(row[2])) for row in rows if row[1]]

    engine_for(connection).add_many(connection, chunks())
    return highest


@event.listens_for(Session, "after_flush")
def _index_flushed(session: Session, _flush: UOWTransaction) -> None:
    """Index the embeddings this flush inserted (in its transaction, so the index commits or rolls back with them),
    each in the space of a version whose new result points at it, and forget the ones it deleted."""
    from ..models import Embedding

    versions = {
        id(obj.embedding): obj.model_version_id
        for obj in session.new
        if isinstance(obj, PredictionResult) and obj.embedding is not None
    }
    new = [obj for obj in session.new if isinstance(obj, Embedding) and id(obj) in versions]
    gone = [obj.id for obj in session.deleted if isinstance(obj, Embedding)]
    if not new and not gone:
        return
    connection = session.connection()
    engine = engine_for(connection)
    if new:
        engine.add(connection, [IndexRow(e.id, space_of(connection, versions[id(e)]), e.vector) for e in new])
    if gone:
        engine.remove(connection, gone)
