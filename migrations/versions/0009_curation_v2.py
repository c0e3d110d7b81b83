"""curation v2: annotation events gain a kind (correction, accepted, skipped, undo) and what they undo; replays run
as background jobs with progress; likely label errors found by cleanlab are stored for a review queue

Revision ID: 0009_curation_v2
Revises: 0008_explanations_sessions
Create Date: 2026-11-29 21:50:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0009_curation_v2'
down_revision = '0008_explanations_sessions'
branch_labels = None
depends_on = None


# In-place ALTER TABLE on SQLite too (recreate='never'): rebuilding annotation_events or replay_reports in batch
# mode would fail under the foreign keys that point at their neighbours once rows are stored (see 0007).


def upgrade():
    with op.batch_alter_table('annotation_events', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=20), server_default='correction', nullable=False))
    # The foreign key of what an event undoes: SQLite cannot add a constraint to a table without rebuilding it (and
    # a rebuild fails under the keys pointing at annotation_events), but its ADD COLUMN takes an inline REFERENCES.
    fk_name = op.f('fk_annotation_events_undoes_id_annotation_events')
    if op.get_bind().dialect.name == 'sqlite':
        op.execute(
            f'ALTER TABLE annotation_events ADD COLUMN undoes_id INTEGER '
            f'CONSTRAINT {fk_name} REFERENCES annotation_events (id)'
        )
    else:
        op.add_column('annotation_events', sa.Column('undoes_id', sa.Integer(), nullable=True))
        op.create_foreign_key(fk_name, 'annotation_events', 'annotation_events', ['undoes_id'], ['id'])
    with op.batch_alter_table('replay_reports', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=20), server_default='finished', nullable=False))
        batch_op.add_column(sa.Column('processed', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('worker', sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(), nullable=True))
    op.create_index(op.f('ix_replay_reports_status'), 'replay_reports', ['status'], unique=False)
    op.create_table(
        'label_issues',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('taxonomy_id', sa.Integer(), nullable=False),
        sa.Column('prediction_id', sa.Integer(), nullable=False),
        sa.Column('quality', sa.Float(), nullable=False),
        sa.Column('given', sa.JSON(), nullable=False),
        sa.Column('suggested', sa.JSON(), nullable=False),
        sa.Column('source', sa.String(length=300), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], name=op.f('fk_label_issues_prediction_id_predictions')),
        sa.ForeignKeyConstraint(['taxonomy_id'], ['taxonomies.id'], name=op.f('fk_label_issues_taxonomy_id_taxonomies')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_label_issues')),
        sa.UniqueConstraint('taxonomy_id', 'prediction_id', name=op.f('uq_label_issues_taxonomy_id')),
    )
    op.create_index(op.f('ix_label_issues_quality'), 'label_issues', ['quality'], unique=False)
    op.create_index(op.f('ix_label_issues_taxonomy_id'), 'label_issues', ['taxonomy_id'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_label_issues_taxonomy_id'), table_name='label_issues')
    op.drop_index(op.f('ix_label_issues_quality'), table_name='label_issues')
    op.drop_table('label_issues')
    op.drop_index(op.f('ix_replay_reports_status'), table_name='replay_reports')
    with op.batch_alter_table('replay_reports', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('finished_at')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('worker')
        batch_op.drop_column('error')
        batch_op.drop_column('processed')
        batch_op.drop_column('status')
    if op.get_bind().dialect.name != 'sqlite':  # SQLite drops the column's inline REFERENCES with it
        op.drop_constraint(
            op.f('fk_annotation_events_undoes_id_annotation_events'), 'annotation_events', type_='foreignkey'
        )
    with op.batch_alter_table('annotation_events', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('undoes_id')
        batch_op.drop_column('kind')
