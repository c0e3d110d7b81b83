"""label changes: the append-only log of label renames, merges and splits per taxonomy

Revision ID: 0006_label_changes
Revises: 0005_replay_reports
Create Date: 2026-11-23 20:20:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006_label_changes'
down_revision = '0005_replay_reports'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('label_changes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('taxonomy_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('actor', sa.String(length=120), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('undone_at', sa.DateTime(), nullable=True),
    sa.Column('undone_by', sa.String(length=120), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['taxonomy_id'], ['taxonomies.id'], name=op.f('fk_label_changes_taxonomy_id_taxonomies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_label_changes'))
    )
    with op.batch_alter_table('label_changes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_label_changes_taxonomy_id'), ['taxonomy_id'], unique=False)


def downgrade():
    with op.batch_alter_table('label_changes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_label_changes_taxonomy_id'))

    op.drop_table('label_changes')
