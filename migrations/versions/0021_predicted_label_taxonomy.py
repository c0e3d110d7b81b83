"""predicted labels name their result's taxonomy: a label filter reads its matches from one index (label,
prediction, taxonomy, result) instead of each match's result row, a random page of a table of millions (a label of
9,250 predictions at a million on SQLite: 64 -> 14 ms warm); filled from the results. PostgreSQL's covering index
of results (0016), which served that read, goes

Revision ID: 0021_predicted_label_taxonomy
Revises: 0020_current_label_taxonomy
Create Date: 2026-12-02 17:00:00

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0021_predicted_label_taxonomy'
down_revision = '0020_current_label_taxonomy'
branch_labels = None
depends_on = None

LABEL_INDEX = 'ix_predicted_labels_label_prediction'
RESULTS_INDEX = 'ix_prediction_results_id_covering'  # PostgreSQL only (0016)


def upgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index(RESULTS_INDEX, table_name='prediction_results')
    with op.batch_alter_table('predicted_labels', schema=None) as batch_op:
        batch_op.drop_index(LABEL_INDEX)
        batch_op.add_column(sa.Column('taxonomy_id', sa.Integer(), nullable=True))
    op.execute(
        'UPDATE predicted_labels SET taxonomy_id = '
        '(SELECT r.taxonomy_id FROM prediction_results r WHERE r.id = predicted_labels.result_id)'
    )
    with op.batch_alter_table('predicted_labels', schema=None) as batch_op:
        batch_op.alter_column('taxonomy_id', existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key(
            batch_op.f('fk_predicted_labels_taxonomy_id_taxonomies'), 'taxonomies', ['taxonomy_id'], ['id']
        )
        batch_op.create_index(LABEL_INDEX, ['label', 'prediction_id', 'taxonomy_id', 'result_id'], unique=False)


def downgrade():
    with op.batch_alter_table('predicted_labels', schema=None) as batch_op:
        batch_op.drop_index(LABEL_INDEX)
        batch_op.drop_constraint(batch_op.f('fk_predicted_labels_taxonomy_id_taxonomies'), type_='foreignkey')
        batch_op.drop_column('taxonomy_id')
        batch_op.create_index(LABEL_INDEX, ['label', 'prediction_id'], unique=False, postgresql_include=['result_id'])
    if op.get_bind().dialect.name == 'postgresql':
        op.create_index(
            RESULTS_INDEX, 'prediction_results', ['id'], postgresql_include=['taxonomy_id', 'prediction_id']
        )
