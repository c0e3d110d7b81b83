"""compact storage (issue 13 point 1): a result's scores as varints in its version's label order, its thresholds only
where they differ from the version's, embeddings as int8 once per prediction and encoder (a table of their own);
every stored result converted, in chunks of predictions, and back on downgrade

Revision ID: 0012_compact_storage
Revises: 0011_current_labels
Create Date: 2026-11-30 09:00:00

"""
from alembic import op
import numpy as np
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0012_compact_storage'
down_revision = '0011_current_labels'
branch_labels = None
depends_on = None


# Plain ALTER TABLE ADD/DROP COLUMN on SQLite too (as 0007): a batch rebuild of prediction_results fails under the
# foreign keys of predicted_labels, current_labels and explanations. So embedding_id is no foreign key (SQLite cannot
# drop a column that is one). `predictions` is not touched, so the FTS5 triggers of 0010 stay as they are.

# Predictions converted per chunk: a chunk's results (every taxonomy's) are read, converted and written at once.
CHUNK = 500

# The byte formats of this revision, written out here (not imported from the app) so this migration keeps writing
# them whatever the app does later; webapp/serving/stored.py documents and reads them, and tests/test_storage.py
# checks that the app reads back what was there. Scores: each label's millionths as an unsigned LEB128 varint, in
# the version's label order. Embeddings: int8, the direction scaled so the largest component is +-127.
OLD_EMBEDDING_DTYPE = '<f4'
GROUPS = 3

VERSIONS = sa.table('model_versions', sa.column('id', sa.String), sa.column('labels', sa.JSON), sa.column('thresholds', sa.JSON))
PREDICTIONS = sa.table('predictions', sa.column('id', sa.Integer))
OLD_RESULTS = sa.table(
    'prediction_results',
    sa.column('id', sa.Integer),
    sa.column('prediction_id', sa.Integer),
    sa.column('model_version_id', sa.String),
    sa.column('scores', sa.JSON),
    sa.column('thresholds', sa.JSON),
    sa.column('embedding', sa.LargeBinary),
)
NEW_RESULTS = sa.table(
    'prediction_results',
    sa.column('id', sa.Integer),
    sa.column('prediction_id', sa.Integer),
    sa.column('model_version_id', sa.String),
    sa.column('score_values', sa.LargeBinary),
    sa.column('scores_by_label', sa.JSON),
    sa.column('thresholds_by_label', sa.JSON),
    sa.column('embedding_id', sa.Integer),
)
# A Table, not a table(): inserting many rows RETURNING their ids in order needs its primary key.
EMBEDDINGS = sa.Table(
    'embeddings', sa.MetaData(), sa.Column('id', sa.Integer, primary_key=True), sa.Column('vector', sa.LargeBinary)
)


def _rounded(values):
    """To the nearest millionth (what a row stores): float32 -> float64 times 10**6 is exact, rint is exact."""
    return np.rint(np.asarray(values, dtype=np.float64) * 1e6) / 1e6


def _pack_scores(values):
    units = np.rint(np.asarray(values, dtype=np.float64) * 1e6).astype(np.int64)
    shifts = 7 * np.arange(GROUPS)
    groups = ((units[:, None] >> shifts) & 0x7F).astype(np.uint8)
    length = 1 + (units[:, None] >= 1 << (shifts[1:])).sum(axis=1)
    groups[np.arange(GROUPS) < (length - 1)[:, None]] |= 0x80
    return groups[np.arange(GROUPS) < length[:, None]].tobytes()


def _pack_embedding(blob):
    values = np.frombuffer(blob, dtype=OLD_EMBEDDING_DTYPE).astype(np.float64)
    peak = float(np.max(np.abs(values), initial=0.0))
    return np.rint(values * (127.0 / peak) if peak > 0 else values).astype('i1').tobytes()


def _unpack_embedding(blob):
    """The normalised float32 vector 0011 stored (from the int8 direction)."""
    values = np.frombuffer(blob, dtype='i1').astype(np.float64)
    norm = float(np.linalg.norm(values))
    return (values / norm if norm > 0 else values).astype(OLD_EMBEDDING_DTYPE).tobytes()


def _unpack_scores(blob):
    data = np.frombuffer(blob, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    length = ends - starts + 1
    padded = np.concatenate((data, np.zeros(GROUPS - 1, dtype=np.uint8))).astype(np.int64) & 0x7F
    units = sum((padded[starts + g] << (7 * g)) * (length > g) for g in range(GROUPS))
    return (units / 1e6).tolist()


def _layouts(bind):
    """Version id -> (labels, thresholds as results store them: float32, then 6 decimals)."""
    layouts = {}
    for row in bind.execute(sa.select(VERSIONS)):
        rounded = _rounded(np.asarray(row.thresholds, dtype=np.float32)).tolist()
        layouts[row.id] = (list(row.labels), dict(zip(row.labels, rounded)))
    return layouts


def _floats_as(given, stored):
    return list(given.items()) == list(stored.items()) and all(type(v) is float for v in given.values())


def _pack(layout, scores, thresholds):
    """(score_values, scores_by_label, thresholds_by_label): the scores packed when they read back unchanged (the
    version's labels in its order, floats on the 6-decimal grid), else kept as they are; thresholds kept only when
    they differ from the version's."""
    labels, version_thresholds = layout
    own = None if _floats_as(thresholds, version_thresholds) else thresholds
    if list(scores) == labels and all(type(v) is float for v in scores.values()):
        values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
        if np.array_equal(_rounded(values), values) and (~np.signbit(values) & (values <= 1)).all():
            return _pack_scores(values), None, own
    return None, scores, own


def _prediction_chunks(bind):
    """Lists of up to CHUNK prediction ids, in id order, read a chunk at a time."""
    after = 0
    while True:
        ids = list(bind.scalars(sa.select(PREDICTIONS.c.id).where(PREDICTIONS.c.id > after).order_by(PREDICTIONS.c.id).limit(CHUNK)))
        if not ids:
            return
        yield ids
        after = ids[-1]


def upgrade():
    op.create_table(
        'embeddings',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('vector', sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_embeddings')),
    )
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('score_values', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('scores_by_label', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('thresholds_by_label', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('embedding_id', sa.Integer(), nullable=True))
    _compact(op.get_bind())
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('embedding')
        batch_op.drop_column('thresholds')
        batch_op.drop_column('scores')


def _compact(bind):
    """Every result's scores, thresholds and embedding in the compact form. The embeddings of one prediction that
    are the same bytes (taxonomies on one encoder) become one row."""
    layouts = _layouts(bind)
    for ids in _prediction_chunks(bind):
        results = bind.execute(
            sa.select(OLD_RESULTS).where(OLD_RESULTS.c.prediction_id.in_(ids)).order_by(OLD_RESULTS.c.id)
        ).all()
        vectors = {}  # (prediction id, float32 bytes) -> index in new_vectors
        new_vectors = []
        for result in results:
            if result.embedding is not None:
                key = (result.prediction_id, bytes(result.embedding))
                if key not in vectors:
                    vectors[key] = len(new_vectors)
                    new_vectors.append(_pack_embedding(key[1]))
        embedding_ids = []
        if new_vectors:
            inserted = bind.execute(
                sa.insert(EMBEDDINGS).returning(EMBEDDINGS.c.id, sort_by_parameter_order=True),
                [{'vector': vector} for vector in new_vectors],
            )
            embedding_ids = [row.id for row in inserted]
        updates = []
        for result in results:
            packed = _pack(layouts[result.model_version_id], result.scores, result.thresholds)
            embedding_id = None
            if result.embedding is not None:
                embedding_id = embedding_ids[vectors[(result.prediction_id, bytes(result.embedding))]]
            updates.append(
                {'rid': result.id, 'sv': packed[0], 'sbl': packed[1], 'tbl': packed[2], 'eid': embedding_id}
            )
        if updates:
            bind.execute(
                sa.update(NEW_RESULTS)
                .where(NEW_RESULTS.c.id == sa.bindparam('rid'))
                .values(
                    score_values=sa.bindparam('sv'),
                    scores_by_label=sa.bindparam('sbl'),
                    thresholds_by_label=sa.bindparam('tbl'),
                    embedding_id=sa.bindparam('eid'),
                ),
                updates,
            )


def downgrade():
    # NOT NULL as before: SQLite adds such a column only with a default, dropped again where the database can.
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('scores', sa.JSON(), server_default='{}', nullable=False))
        batch_op.add_column(sa.Column('thresholds', sa.JSON(), server_default='{}', nullable=False))
        batch_op.add_column(sa.Column('embedding', sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    _expand(bind)
    if bind.dialect.name != 'sqlite':
        op.alter_column('prediction_results', 'scores', server_default=None)
        op.alter_column('prediction_results', 'thresholds', server_default=None)
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('embedding_id')
        batch_op.drop_column('thresholds_by_label')
        batch_op.drop_column('scores_by_label')
        batch_op.drop_column('score_values')
    op.drop_table('embeddings')


def _expand(bind):
    """Every result back in the form of 0011: scores and thresholds as JSON objects in label order, its own copy of
    the embedding as normalised float32 (from its int8 direction)."""
    layouts = _layouts(bind)
    for ids in _prediction_chunks(bind):
        results = bind.execute(
            sa.select(NEW_RESULTS).where(NEW_RESULTS.c.prediction_id.in_(ids)).order_by(NEW_RESULTS.c.id)
        ).all()
        wanted = sorted({r.embedding_id for r in results if r.embedding_id is not None})
        vectors = {
            row.id: _unpack_embedding(row.vector)
            for row in bind.execute(sa.select(EMBEDDINGS).where(EMBEDDINGS.c.id.in_(wanted)))
        } if wanted else {}
        updates = []
        for result in results:
            labels, version_thresholds = layouts[result.model_version_id]
            if result.scores_by_label is not None:
                scores = result.scores_by_label
            else:
                scores = dict(zip(labels, _unpack_scores(result.score_values), strict=True))
            thresholds = result.thresholds_by_label if result.thresholds_by_label is not None else version_thresholds
            updates.append({'rid': result.id, 's': scores, 't': thresholds, 'e': vectors.get(result.embedding_id)})
        if updates:
            bind.execute(
                sa.update(OLD_RESULTS)
                .where(OLD_RESULTS.c.id == sa.bindparam('rid'))
                .values(scores=sa.bindparam('s'), thresholds=sa.bindparam('t'), embedding=sa.bindparam('e')),
                updates,
            )
