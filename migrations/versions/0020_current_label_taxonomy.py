"""current labels name their result's taxonomy: the labels curators gave, per taxonomy, are read from one index
(the label filter's vocabulary, on every history page) instead of joining every corrected result to its row
(20 ms a page with 3,300 corrected results at a million, growing with every correction); filled from the results

Revision ID: 0020_current_label_taxonomy
Revises: 0019_similar_shards
Create Date: 2026-12-02 14:40:00

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0020_current_label_taxonomy'
down_revision = '0019_similar_shards'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('current_labels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('taxonomy_id', sa.Integer(), nullable=True))
    op.execute(
        'UPDATE current_labels SET taxonomy_id = '
        '(SELECT r.taxonomy_id FROM prediction_results r WHERE r.id = current_labels.result_id)'
    )
    with op.batch_alter_table('current_labels', schema=None) as batch_op:
        batch_op.alter_column('taxonomy_id', existing_type=sa.Integer(), nullable=False)
        batch_op.create_foreign_key(
            batch_op.f('fk_current_labels_taxonomy_id_taxonomies'), 'taxonomies', ['taxonomy_id'], ['id']
        )
        batch_op.create_index('ix_current_labels_taxonomy_label', ['taxonomy_id', 'label'], unique=False)


def downgrade():
    with op.batch_alter_table('current_labels', schema=None) as batch_op:
        batch_op.drop_index('ix_current_labels_taxonomy_label')
        batch_op.drop_constraint(batch_op.f('fk_current_labels_taxonomy_id_taxonomies'), type_='foreignkey')
        batch_op.drop_column('taxonomy_id')
