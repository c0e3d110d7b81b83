"""current labels: one row per label a corrected result has now (the model's labels with the active corrections
applied), kept by the review command, so the history label filter finds labels curators added and not those they
removed in one indexed query; filled from the corrections already stored

Revision ID: 0011_current_labels
Revises: 0010_fulltext_search
Create Date: 2026-11-29 22:10:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011_current_labels'
down_revision = '0010_fulltext_search'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'current_labels',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('result_id', sa.Integer(), nullable=False),
        sa.Column('prediction_id', sa.Integer(), nullable=False),
        sa.Column('label', sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], name=op.f('fk_current_labels_prediction_id_predictions')),
        sa.ForeignKeyConstraint(['result_id'], ['prediction_results.id'], name=op.f('fk_current_labels_result_id_prediction_results')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_current_labels')),
    )
    op.create_index('ix_current_labels_label_prediction', 'current_labels', ['label', 'prediction_id'], unique=False)
    op.create_index(op.f('ix_current_labels_result_id'), 'current_labels', ['result_id'], unique=False)
    _backfill()


def downgrade():
    op.drop_index(op.f('ix_current_labels_result_id'), table_name='current_labels')
    op.drop_index('ix_current_labels_label_prediction', table_name='current_labels')
    op.drop_table('current_labels')


# The tables as this revision knows them (not the app's models, which follow later migrations).
EVENTS = sa.table(
    'annotation_events',
    sa.column('id', sa.Integer),
    sa.column('prediction_id', sa.Integer),
    sa.column('taxonomy_id', sa.Integer),
    sa.column('created_at', sa.DateTime),
    sa.column('added', sa.JSON),
    sa.column('removed', sa.JSON),
    sa.column('kind', sa.String),
    sa.column('undoes_id', sa.Integer),
)
RESULTS = sa.table(
    'prediction_results',
    sa.column('id', sa.Integer),
    sa.column('prediction_id', sa.Integer),
    sa.column('taxonomy_id', sa.Integer),
    sa.column('labels', sa.JSON),
)
CURRENT = sa.table(
    'current_labels', sa.column('result_id', sa.Integer), sa.column('prediction_id', sa.Integer), sa.column('label', sa.String)
)


def _backfill():
    """Rows for every result with a correction event: its labels with the active corrections applied in order (an
    event is active unless an active undo reverses it), in the names stored; readers map them through the label
    changes like the model's labels. The same rule as webapp.curation.annotations.current_labels."""
    bind = op.get_bind()
    events = {}
    for row in bind.execute(sa.select(EVENTS).order_by(EVENTS.c.id)):
        events.setdefault((row.prediction_id, row.taxonomy_id), []).append(row)
    corrected = {pair for pair, rows in events.items() if any(row.kind == 'correction' for row in rows)}
    if not corrected:
        return
    rows = []
    for result in bind.execute(sa.select(RESULTS)):
        pair = (result.prediction_id, result.taxonomy_id)
        if pair not in corrected:
            continue
        own = events[pair]
        undone = set()
        for event in reversed(own):
            if event.kind == 'undo' and event.id not in undone and event.undoes_id is not None:
                undone.add(event.undoes_id)
        labels = set(result.labels or [])
        for event in sorted(own, key=lambda e: (e.created_at, e.id)):
            if event.kind == 'correction' and event.id not in undone:
                labels = (labels - set(event.removed or [])) | set(event.added or [])
        rows += [{'result_id': result.id, 'prediction_id': result.prediction_id, 'label': label} for label in sorted(labels)]
    if rows:
        op.bulk_insert(CURRENT, rows)
