"""The vector index behind similar papers (issue 13 point 3): which stored results lie nearest a result of the same
model version, with memory bounded per web worker whatever the history's size. One engine is chosen per database at
run time and logged once:

- **SQLite: sqlite-vec** (the ``sqlite-vec`` wheel, loaded on every connection by :func:`load_sqlite_vec`). Each
  result's embedding is indexed as its binary code, the sign bit of each int8 component (48 bytes for MiniLM's 384),
  in a ``vec0`` table per code width (``similar_codes_<bits>``) partitioned by model version; a query takes the
  nearest codes by Hamming distance and :mod:`webapp.similar` ranks them by the exact cosine of their stored int8
  vectors. Why codes and not ``int8[384]`` rows: sqlite-vec 0.1.9 has flat (brute-force) tables only, and at a
  million rows of one version its int8 cosine scan took 1.2 s a query on the 2-core box (shared, load ~2), a
  ``vec_distance_cosine`` scan of the ``embeddings`` table as long, the Hamming scan of codes 60-150 ms for 8-64
  candidates (``bench/similar_scale.py`` measures whole requests); codes also add ~80 bytes a result to the
  database where ``int8[384]`` rows would add ~420.
- **PostgreSQL with pgvector** (created by migration 0013 where ``pg_available_extensions`` offers it): each result's
  int8 vector as a ``halfvec`` (a ``vector`` before pgvector 0.7; int8 values are exact in both) in a table per width
  (``similar_vectors_<width>``), with an HNSW index (cosine) per model version, queried with ``<=>``.
- **PostgreSQL without pgvector**: no index; a query streams the version's vectors in chunks and keeps the best
  (exact, memory bounded by the chunk; its time grows with the version's size).

Every engine answers *candidates*: result ids of the version, roughly nearest first, that :mod:`webapp.similar` ranks
exactly. The index is written where results are (an ORM flush listener below; Core writers call :func:`add`), so a
new prediction is found at once; a deleted result leaves its index row too.
"""

from __future__ import annotations

import ctypes
import logging
import sqlite3
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from hashlib import sha256
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, UOWTransaction

from .serving.stored import EMBEDDING_DTYPE

log = logging.getLogger(__name__)

# vec0 answers at most this many neighbours a query.
MAX_CANDIDATES = 4096
# Result ids read per query by the exact scan: ~4,096 rows of a version with two taxonomies (x 768 hex digits each for
# MiniLM), the most it holds at once.
SCAN_IDS = 8192
CODE_TABLE = "similar_codes_{bits}"
VECTOR_TABLE = "similar_vectors_{width}"
# Every table the index makes starts so (migrations/env.py keeps autogenerate off them; 0013's downgrade drops them).
TABLE_PREFIX = "similar_"


class IndexRow(NamedTuple):
    """One result to index: its id, its model version and its embedding (int8 bytes, ``webapp/serving/stored.py``)."""

    result_id: int
    version_id: str
    vector: bytes


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
        """Index ``rows`` in ``connection``'s transaction."""

    def remove(self, connection: Connection, result_ids: Sequence[int]) -> None:
        """Forget these results."""

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> list[int]:
        """Up to ``n`` result ids of ``version_id`` (``vector`` among them if stored), roughly nearest ``vector`` first;
        fewer only when the version has fewer results."""
        raise NotImplementedError


class SqliteVec(IndexEngine):
    """Binary codes in sqlite-vec ``vec0`` tables, one per code width, partitioned by model version."""

    name = "sqlite-vec"

    @staticmethod
    def table(bits: int) -> str:
        return CODE_TABLE.format(bits=bits)

    def add(self, connection: Connection, rows: Sequence[IndexRow]) -> None:
        by_width: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            code = binary_code(row.vector)
            by_width.setdefault(8 * len(code), []).append(
                {"id": row.result_id, "version": row.version_id, "code": code}
            )
        for bits, values in by_width.items():
            table = self.table(bits)
            # In the writer's transaction: SQLite has one writer at a time, and another connection would wait on it.
            connection.execute(
                text(
                    f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING vec0("
                    f"model_version_id text partition key, code bit[{bits}])"
                )
            )
            connection.execute(
                text(f"INSERT INTO {table} (rowid, model_version_id, code) VALUES (:id, :version, vec_bit(:code))"),
                values,
            )

    def remove(self, connection: Connection, result_ids: Sequence[int]) -> None:
        for (table,) in connection.execute(
            text("SELECT name FROM sqlite_master WHERE name GLOB 'similar_codes_*' AND sql LIKE 'CREATE VIRTUAL%'")
        ):
            connection.execute(text(f"DELETE FROM {table} WHERE rowid = :id"), [{"id": i} for i in result_ids])

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> list[int]:
        code = binary_code(vector)
        table = self.table(8 * len(code))
        exists = connection.execute(text("SELECT 1 FROM sqlite_master WHERE name = :t"), {"t": table}).first()
        if exists is None:
            return []
        rows = connection.execute(
            text(
                f"SELECT rowid FROM {table} WHERE code MATCH vec_bit(:code) AND k = :k "
                "AND model_version_id = :version ORDER BY distance"
            ),
            {"code": code, "k": min(n, MAX_CANDIDATES), "version": version_id},
        )
        return [row[0] for row in rows]


class PgVector(IndexEngine):
    """pgvector: a table of vectors per width, an HNSW index (cosine) per model version."""

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
    def index_name(table: str, version_id: str) -> str:
        return f"ix_{table}_{sha256(version_id.encode()).hexdigest()[:16]}"

    def ensure(self, connection: Connection, width: int, version_id: str) -> None:
        """The width's table and the version's HNSW index. Made on a connection of their own and committed at once:
        inside a writer's transaction, CREATE INDEX would hold a lock that two writers of a new version could
        deadlock on."""
        table = self.table(width)
        index = self.index_name(table, version_id)
        if connection.execute(text("SELECT to_regclass(:i)"), {"i": index}).scalar() is not None:
            return
        with connection.engine.connect() as ddl:
            try:
                ddl.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {table} (result_id integer PRIMARY KEY, "
                        f"model_version_id varchar(64) NOT NULL, embedding {self.type}({width}) NOT NULL)"
                    )
                )
                opclass = self.column_type(ddl, table).split("(")[0] + "_cosine_ops"
                ddl.execute(
                    text(
                        f"CREATE INDEX IF NOT EXISTS {index} ON {table} USING hnsw (embedding {opclass}) "
                        f"WHERE model_version_id = {_quoted(version_id)}"
                    )
                )
                ddl.commit()
            except Exception as exc:  # noqa: BLE001 - another worker made the same table or index meanwhile
                ddl.rollback()
                if ddl.execute(text("SELECT to_regclass(:i)"), {"i": index}).scalar() is None:
                    raise RuntimeError(f"could not create the similar-papers index {index}") from exc

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
        for width, version_id in {(len(row.vector), row.version_id) for row in rows}:
            self.ensure(connection, width, version_id)
        by_table: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            width = len(row.vector)
            by_table.setdefault(self.table(width), []).append(
                {"id": row.result_id, "version": row.version_id, "vector": _pgvector_literal(row.vector)}
            )
        for table, values in by_table.items():
            column_type = self.column_type(connection, table)
            connection.execute(
                text(
                    f"INSERT INTO {table} (result_id, model_version_id, embedding) "
                    f"VALUES (:id, :version, CAST(:vector AS {column_type}))"
                ),
                values,
            )

    def remove(self, connection: Connection, result_ids: Sequence[int]) -> None:
        tables = connection.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE :p"),
            {"p": VECTOR_TABLE.format(width="%")},
        ).scalars()
        for table in tables:
            connection.execute(text(f"DELETE FROM {table} WHERE result_id = ANY(:ids)"), {"ids": list(result_ids)})

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> list[int]:
        table = self.table(len(vector))
        if connection.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None:
            return []
        column_type = self.column_type(connection, table)
        # The version's partial index serves only a plan that knows the version: no generic plan. HNSW returns at
        # most ef_search rows (pgvector caps it at 1000).
        connection.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        connection.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, min(n, 1000))}"))
        rows = connection.execute(
            text(
                f"SELECT result_id FROM {table} WHERE model_version_id = :version "
                f"ORDER BY embedding <=> CAST(:vector AS {column_type}) LIMIT :n"
            ),
            {"version": version_id, "vector": _pgvector_literal(vector), "n": n},
        )
        return [row[0] for row in rows]


class ExactScan(IndexEngine):
    """No index (PostgreSQL without pgvector): the version's vectors read a range of ``SCAN_IDS`` result ids at a
    time, each range as one row (ids and hex vectors aggregated by the database, so Python handles no row one by
    one), the best ``n`` kept."""

    name = "exact scan"

    def candidates(self, connection: Connection, version_id: str, vector: bytes, n: int) -> list[int]:
        low, high = connection.execute(
            text("SELECT min(id), max(id) FROM prediction_results WHERE model_version_id = :version"),
            {"version": version_id},
        ).one()
        if low is None:
            return []
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
        return best_ids[order].tolist()


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


def add(connection: Connection, rows: Iterable[IndexRow]) -> None:
    """Index results written outside the ORM (bulk fills); ORM writes are indexed by the flush listener."""
    rows = list(rows)
    if rows:
        engine_for(connection).add(connection, rows)


def add_stored(connection: Connection, after: int = 0, chunk: int = 2000) -> int:
    """Index every stored result with an embedding and an id above ``after`` (what a Core writer stored: a bulk
    fill), ``chunk`` at a time in ``connection``'s transaction; returns the highest id seen (``after`` if none)."""
    while True:
        rows = connection.execute(
            text(
                "SELECT r.id, r.model_version_id, e.vector FROM prediction_results r "
                "JOIN embeddings e ON e.id = r.embedding_id WHERE r.id > :after ORDER BY r.id LIMIT :n"
            ),
            {"after": after, "n": chunk},
        ).all()
        if not rows:
            return after
        add(connection, [IndexRow(row[0], row[1], bytes(row[2])) for row in rows])
        after = rows[-1][0]


@event.listens_for(Session, "after_flush")
def _index_flushed(session: Session, _flush: UOWTransaction) -> None:
    """Index the results this flush inserted (in its transaction, so the index commits or rolls back with them) and
    forget the ones it deleted."""
    from .models import PredictionResult

    new = [
        IndexRow(obj.id, obj.model_version_id, obj.embedding.vector)
        for obj in session.new
        if isinstance(obj, PredictionResult) and obj.embedding is not None
    ]
    gone = [obj.id for obj in session.deleted if isinstance(obj, PredictionResult)]
    if not new and not gone:
        return
    connection = session.connection()
    engine = engine_for(connection)
    if new:
        engine.add(connection, new)
    if gone:
        engine.remove(connection, gone)
