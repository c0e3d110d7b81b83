"""batch jobs: uploaded CSVs, their rows, and the foreign key from predictions to their batch

Revision ID: 0004_batch_jobs
Revises: 0003_curation
Create Date: 2026-11-23 18:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004_batch_jobs'
down_revision = '0003_curation'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('batch_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('created_by', sa.String(length=120), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('columns', sa.JSON(), nullable=False),
    sa.Column('title_column', sa.Integer(), nullable=True),
    sa.Column('abstract_column', sa.Integer(), nullable=False),
    sa.Column('total_rows', sa.Integer(), nullable=False),
    sa.Column('processed', sa.Integer(), nullable=False),
    sa.Column('skipped', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('worker', sa.String(length=120), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_jobs'))
    )
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_jobs_status'), ['status'], unique=False)

    op.create_table('batch_rows',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('row_number', sa.Integer(), nullable=False),
    sa.Column('cells', sa.JSON(), nullable=False),
    sa.Column('prediction_id', sa.Integer(), nullable=True),
    sa.Column('skip_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['batch_jobs.id'], name=op.f('fk_batch_rows_job_id_batch_jobs')),
    sa.ForeignKeyConstraint(['prediction_id'], ['predictions.id'], name=op.f('fk_batch_rows_prediction_id_predictions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_rows'))
    )
    with op.batch_alter_table('batch_rows', schema=None) as batch_op:
        batch_op.create_index('ix_batch_rows_job_row', ['job_id', 'row_number'], unique=True)

    # predictions.batch_id existed from the start; only its foreign key is new (SQLite rebuilds the table).
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_foreign_key(
            batch_op.f('fk_predictions_batch_id_batch_jobs'), 'batch_jobs', ['batch_id'], ['id']
        )


def downgrade():
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_predictions_batch_id_batch_jobs'), type_='foreignkey')

    with op.batch_alter_table('batch_rows', schema=None) as batch_op:
        batch_op.drop_index('ix_batch_rows_job_row')

    op.drop_table('batch_rows')
    with op.batch_alter_table('batch_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_jobs_status'))

    op.drop_table('batch_jobs')
