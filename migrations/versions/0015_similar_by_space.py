"""similar papers' index holds embeddings once per embedding space (the versions sharing an encoder), not results
once per version: one search serves every taxonomy on the shared encoder; results are found from their embedding
by a new index; the index is rebuilt from the stored embeddings, and back to 0013's layout on downgrade

Revision ID: 0015_similar_by_space
Revises: 0014_batch_chunks
Create Date: 2026-11-30 04:00:00

"""
import importlib.util
import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0015_similar_by_space'
down_revision = '0014_batch_chunks'
branch_labels = None
depends_on = None


# The index's layout (webapp/evidence/similar_index.py reads and extends it as new widths and spaces appear), written out here
# so this migration keeps building what it built whatever the app does later:
# - A space is 'encoder:<the manifest's encoder_sha256>', or 'version:<version id>' for a manifest without one; an
#   embedding's space is that of the first result (lowest id) pointing at it.
# - SQLite (sqlite-vec): per code width in bits, a vec0 table similar_space_codes_<bits> (space text partition key,
#   code bit[<bits>]), rowid = the embedding's id; the code is the sign bit of each int8 component (set where
#   positive), numpy's packbits order, zero-padded to whole bytes.
# - PostgreSQL with pgvector: per width, similar_space_vectors_<width> (embedding_id, space, embedding halfvec(<width>),
#   vector(<width>) before pgvector 0.7), and an HNSW index (cosine) per space,
#   ix_similar_space_vectors_<width>_<sha256(space)[:16]>, built after the rows are in.
# - PostgreSQL without pgvector: nothing (similar papers scan the embeddings).

# Embeddings indexed per chunk.
CHUNK = 2000


def _spaces(bind):
    spaces = {}
    for version_id, manifest in bind.execute(sa.text('SELECT id, manifest FROM model_versions')):
        if isinstance(manifest, str):
            manifest = json.loads(manifest)
        digest = manifest.get('encoder_sha256') if isinstance(manifest, dict) else None
        spaces[version_id] = f'encoder:{digest}' if isinstance(digest, str) and digest else f'version:{version_id}'
    return spaces


def _rows(bind):
    """(embedding id, space, int8 vector) of every embedding a result points at, a chunk at a time in id order."""
    spaces = _spaces(bind)
    after = 0
    while True:
        chunk = bind.execute(
            sa.text(
                'SELECT e.id, (SELECT r.model_version_id FROM prediction_results r WHERE r.embedding_id = e.id '
                'ORDER BY r.id LIMIT 1), e.vector FROM embeddings e WHERE e.id > :after ORDER BY e.id LIMIT :n'
            ),
            {'after': after, 'n': CHUNK},
        ).all()
        if not chunk:
            return
        yield [(row[0], spaces[row[1]], bytes(row[2])) for row in chunk if row[1] is not None]
        after = chunk[-1][0]


def _drop(bind, sqlite_glob, pg_like):
    if bind.dialect.name == 'sqlite':
        tables = bind.execute(sa.text(
            f"SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB '{sqlite_glob}' "
            "AND sql LIKE 'CREATE VIRTUAL TABLE%'"
        )).scalars().all()
    else:
        tables = bind.execute(sa.text(
            f"SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE '{pg_like}'"
        )).scalars().all()
    for table in tables:
        bind.execute(sa.text(f'DROP TABLE {table}'))


def _pgvector(bind):
    return bind.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()


def upgrade():
    bind = op.get_bind()
    op.create_index('ix_prediction_results_embedding_id', 'prediction_results', ['embedding_id'])
    _drop(bind, 'similar_codes_*', 'similar\\_vectors\\_%')
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
        for embedding_id, space, vector in chunk:
            code = np.packbits(np.frombuffer(vector, dtype='i1') > 0).tobytes()
            by_table.setdefault(8 * len(code), []).append({'id': embedding_id, 'space': space, 'code': code})
        for bits, values in by_table.items():
            table = f'similar_space_codes_{bits}'
            if bits not in made:
                bind.execute(sa.text(
                    f'CREATE VIRTUAL TABLE {table} USING vec0(space text partition key, code bit[{bits}])'
                ))
                made.add(bits)
            bind.execute(
                sa.text(f'INSERT INTO {table} (rowid, space, code) VALUES (:id, :space, vec_bit(:code))'), values
            )


def _build_pgvector(bind, extension):
    version = tuple(int(p) for p in extension.split('.')[:2])
    column_type = 'halfvec' if version >= (0, 7) else 'vector'
    indexes = set()  # (table, space)
    for chunk in _rows(bind):
        by_table = {}
        for embedding_id, space, vector in chunk:
            width = len(vector)
            literal = '[' + ','.join(map(str, np.frombuffer(vector, dtype='i1').tolist())) + ']'
            by_table.setdefault(width, []).append({'id': embedding_id, 'space': space, 'vector': literal})
            indexes.add((f'similar_space_vectors_{width}', space))
        for width, values in by_table.items():
            table = f'similar_space_vectors_{width}'
            bind.execute(sa.text(
                f'CREATE TABLE IF NOT EXISTS {table} (embedding_id integer PRIMARY KEY, '
                f'space varchar(90) NOT NULL, embedding {column_type}({width}) NOT NULL)'
            ))
            bind.execute(
                sa.text(
                    f'INSERT INTO {table} (embedding_id, space, embedding) '
                    f'VALUES (:id, :space, CAST(:vector AS {column_type}({width})))'
                ),
                values,
            )
    for table, space in sorted(indexes):
        name = f'ix_{table}_{sha256(space.encode()).hexdigest()[:16]}'
        quoted = "'" + space.replace("'", "''") + "'"
        bind.execute(sa.text(
            f'CREATE INDEX {name} ON {table} USING hnsw (embedding {column_type}_cosine_ops) WHERE space = {quoted}'
        ))


def downgrade():
    # 0013's layout, built by 0013's own code (one index row per result, partitioned by version).
    bind = op.get_bind()
    _drop(bind, 'similar_space_codes_*', 'similar\\_space\\_vectors\\_%')
    op.drop_index('ix_prediction_results_embedding_id', table_name='prediction_results')
    spec = importlib.util.spec_from_file_location('vector_index_0013', Path(__file__).with_name('0013_vector_index.py'))
    vector_index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vector_index)
    if bind.dialect.name == 'sqlite':
        vector_index._build_sqlite(bind)
    else:
        extension = _pgvector(bind)
        if extension:
            vector_index._build_pgvector(bind, extension)
