"""replay reports: what a candidate version would change, kept for the replay page

Revision ID: 0005_replay_reports
Revises: 0004_batch_jobs
Create Date: 2026-11-23 20:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0005_replay_reports'
down_revision = '0004_batch_jobs'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('replay_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('taxonomy_id', sa.Integer(), nullable=False),
    sa.Column('candidate_version_id', sa.String(length=80), nullable=False),
    sa.Column('active_version_id', sa.String(length=80), nullable=False),
    sa.Column('sample_size', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=120), nullable=True),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['active_version_id'], ['model_versions.id'], name=op.f('fk_replay_reports_active_version_id_model_versions')),
    sa.ForeignKeyConstraint(['candidate_version_id'], ['model_versions.id'], name=op.f('fk_replay_reports_candidate_version_id_model_versions')),
    sa.ForeignKeyConstraint(['taxonomy_id'], ['taxonomies.id'], name=op.f('fk_replay_reports_taxonomy_id_taxonomies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_replay_reports'))
    )
    with op.batch_alter_table('replay_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_replay_reports_candidate_version_id'), ['candidate_version_id'], unique=False)


def downgrade():
    with op.batch_alter_table('replay_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_replay_reports_candidate_version_id'))

    op.drop_table('replay_reports')
