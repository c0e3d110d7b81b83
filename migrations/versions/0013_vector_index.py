"""vector index for similar papers (issue 13 point 3): every stored result's embedding indexed, in chunks, in the
engine of its database; downgrade drops the index

Revision ID: 0013_vector_index
Revises: 0012_compact_storage
Create Date: 2026-11-30 12:00:00

"""
from hashlib import sha256

import numpy as np
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0013_vector_index'
down_revision = '0012_compact_storage'
branch_labels = None
depends_on = None


# The index's layout (webapp/evidence/similar_index.py reads and extends it as new widths appear), written out here so this
# migration keeps building what it built whatever the app does later:
# - SQLite (sqlite-vec, loaded on every connection by the app): per code width in bits, a vec0 table
#   similar_codes_<bits> (model_version_id text partition key, code bit[<bits>]), rowid = the result's id; the code
#   is the sign bit of each int8 component (set where positive), numpy's packbits order, zero-padded to whole bytes.
# - PostgreSQL with pgvector (created here when the server offers it): per width, similar_vectors_<width>
#   (result_id, model_version_id, embedding halfvec(<width>), vector(<width>) before pgvector 0.7), and an HNSW index
#   (cosine) per model version, ix_similar_vectors_<width>_<sha256(version)[:16]>, built after the rows are in.
# - PostgreSQL without pgvector: nothing (similar papers scan the embeddings).

# Results indexed per chunk.
CHUNK = 2000


def _rows(bind):
    """(result id, model version, int8 vector) of every result with an embedding, a chunk at a time in id order."""
    after = 0
    while True:
        chunk = bind.execute(
            sa.text(
                'SELECT r.id, r.model_version_id, e.vector FROM prediction_results r '
                'JOIN embeddings e ON e.id = r.embedding_id WHERE r.id > :after ORDER BY r.id LIMIT :n'
            ),
            {'after': after, 'n': CHUNK},
        ).all()
        if not chunk:
            return
        yield [(row[0], row[1], bytes(row[2])) for row in chunk]
        after = chunk[-1][0]


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        _build_sqlite(bind)
    else:
        extension = _pgvector(bind)
        if extension:
            _build_pgvector(bind, extension)


def _build_sqlite(bind):
    made = set()
    for chunk in _rows(bind):
        by_table = {}
        for result_id, version_id, vector in chunk:
            code = np.packbits(np.frombuffer(vector, dtype='i1') > 0).tobytes()
            by_table.setdefault(8 * len(code), []).append({'id': result_id, 'version': version_id, 'code': code})
        for bits, values in by_table.items():
            table = f'similar_codes_{bits}'
            if bits not in made:
                bind.execute(sa.text(
                    f'CREATE VIRTUAL TABLE {table} USING vec0(model_version_id text partition key, code bit[{bits}])'
                ))
                made.add(bits)
            bind.execute(
                sa.text(f'INSERT INTO {table} (rowid, model_version_id, code) VALUES (:id, :version, vec_bit(:code))'),
                values,
            )


def _pgvector(bind):
    """pgvector's version once it is installed here (installed now if the server offers it), else None. A role that
    may not create it leaves the database without (the app then scans)."""
    if bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is None:
        return None
    try:
        with bind.begin_nested():
            bind.execute(sa.text('CREATE EXTENSION IF NOT EXISTS vector'))
    except sa.exc.DBAPIError:
        return None
    return bind.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()


def _build_pgvector(bind, extension):
    version = tuple(int(p) for p in extension.split('.')[:2])
    column_type = 'halfvec' if version >= (0, 7) else 'vector'
    indexes = set()  # (table, model version)
    for chunk in _rows(bind):
        by_table = {}
        for result_id, version_id, vector in chunk:
            width = len(vector)
            literal = '[' + ','.join(map(str, np.frombuffer(vector, dtype='i1').tolist())) + ']'
            by_table.setdefault(width, []).append({'id': result_id, 'version': version_id, 'vector': literal})
            indexes.add((f'similar_vectors_{width}', version_id))
        for width, values in by_table.items():
            table = f'similar_vectors_{width}'
            bind.execute(sa.text(
                f'CREATE TABLE IF NOT EXISTS {table} (result_id integer PRIMARY KEY, '
                f'model_version_id varchar(64) NOT NULL, embedding {column_type}({width}) NOT NULL)'
            ))
            bind.execute(
                sa.text(
                    f'INSERT INTO {table} (result_id, model_version_id, embedding) '
                    f'VALUES (:id, :version, CAST(:vector AS {column_type}({width})))'
                ),
                values,
            )
    for table, version_id in sorted(indexes):
        name = f'ix_{table}_{sha256(version_id.encode()).hexdigest()[:16]}'
        quoted = "'" + version_id.replace("'", "''") + "'"
        bind.execute(sa.text(
            f'CREATE INDEX {name} ON {table} USING hnsw (embedding {column_type}_cosine_ops) '
            f'WHERE model_version_id = {quoted}'
        ))


def downgrade():
    # The tables of every width, the migration's and those the app made since. pgvector stays installed (other
    # databases of the server may use it; installing it needed rights a downgrade may not have).
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        tables = bind.execute(sa.text(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'similar_codes_*' "
            "AND sql LIKE 'CREATE VIRTUAL TABLE%'"
        )).scalars().all()
    else:
        tables = bind.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename LIKE 'similar\\_vectors\\_%'"
        )).scalars().all()
    for table in tables:
        bind.execute(sa.text(f'DROP TABLE {table}'))
