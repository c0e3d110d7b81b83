"""covering indexes for the label filter on PostgreSQL: a label's rows and their results' taxonomies are read from
indexes alone (index-only scans), not from the tables' pages; SQLite's rowid tables and indexes need nothing

Revision ID: 0016_covering_label_indexes
Revises: 0015_similar_by_space
Create Date: 2026-11-30 07:30:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0016_covering_label_indexes'
down_revision = '0015_similar_by_space'
branch_labels = None
depends_on = None

# A label filter reads every row of the label (predicted_labels: label -> result, prediction) and each row's result
# (prediction_results: id -> taxonomy, prediction). Both came from the tables' pages, 100 ms for a label with 10,000
# predictions at a million (bench/scale.py); with these they come from the indexes. The second is kept outside the
# models, as the full-text index is (migrations/env.py): SQLite finds a result by its rowid already.
RESULTS_INDEX = 'ix_prediction_results_id_covering'


def upgrade():
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index('ix_predicted_labels_label_prediction', table_name='predicted_labels')
    op.create_index(
        'ix_predicted_labels_label_prediction',
        'predicted_labels',
        ['label', 'prediction_id'],
        postgresql_include=['result_id'],
    )
    op.create_index(RESULTS_INDEX, 'prediction_results', ['id'], postgresql_include=['taxonomy_id', 'prediction_id'])


def downgrade():
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index(RESULTS_INDEX, table_name='prediction_results')
    op.drop_index('ix_predicted_labels_label_prediction', table_name='predicted_labels')
    op.create_index('ix_predicted_labels_label_prediction', 'predicted_labels', ['label', 'prediction_id'])
