"""explanations are cached per (result, version); signed-in sessions are rows that can be revoked

Revision ID: 0008_explanations_sessions
Revises: 0007_prediction_reading
Create Date: 2026-11-29 21:05:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008_explanations_sessions'
down_revision = '0007_prediction_reading'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'explanations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('result_id', sa.Integer(), nullable=False),
        sa.Column('model_version_id', sa.String(length=80), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('payload', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_explanations_model_version_id_model_versions')),
        sa.ForeignKeyConstraint(['result_id'], ['prediction_results.id'], name=op.f('fk_explanations_result_id_prediction_results')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_explanations')),
        sa.UniqueConstraint('result_id', 'model_version_id', name=op.f('uq_explanations_result_id')),
    )
    op.create_index(op.f('ix_explanations_result_id'), 'explanations', ['result_id'], unique=False)
    op.create_table(
        'user_sessions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('key_sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_user_sessions_user_id_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_user_sessions')),
        sa.UniqueConstraint('key_sha256', name=op.f('uq_user_sessions_key_sha256')),
    )
    op.create_index(op.f('ix_user_sessions_user_id'), 'user_sessions', ['user_id'], unique=False)


def downgrade():
    op.drop_index(op.f('ix_user_sessions_user_id'), table_name='user_sessions')
    op.drop_table('user_sessions')
    op.drop_index(op.f('ix_explanations_result_id'), table_name='explanations')
    op.drop_table('explanations')

