"""batch chunks (issue 13 point 2): a CSV batch is tagged in chunks any worker takes, so several workers share one
batch; the batches still queued or running get the chunks of their rows not yet tagged

Revision ID: 0014_batch_chunks
Revises: 0013_vector_index
Create Date: 2026-12-01 12:00:00

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0014_batch_chunks'
down_revision = '0013_vector_index'
branch_labels = None
depends_on = None


# Taggable rows per chunk, the default BATCH_CHUNK_SIZE, written out so this migration keeps building what it built.
CHUNK = 32


def upgrade():
    chunks = op.create_table('batch_chunks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('first_row', sa.Integer(), nullable=False),
    sa.Column('last_row', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('worker', sa.String(length=120), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['batch_jobs.id'], name=op.f('fk_batch_chunks_job_id_batch_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_chunks'))
    )
    with op.batch_alter_table('batch_chunks', schema=None) as batch_op:
        batch_op.create_index('ix_batch_chunks_job_status', ['job_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_chunks_status'), ['status'], unique=False)

    # The open batches: their rows not yet tagged (nor skipped) become chunks, queued; the workers' sweep queues a
    # task for each and ends a batch left with none (its rows all done). A worker of the release before, still
    # holding a batch, loses it at its next heartbeat (it renews only while it is the batch's worker) and commits
    # nothing more.
    bind = op.get_bind()
    open_jobs = bind.execute(
        sa.text("SELECT id FROM batch_jobs WHERE status IN ('queued', 'running') ORDER BY id")
    ).scalars().all()
    for job_id in open_jobs:
        numbers = bind.execute(
            sa.text(
                'SELECT row_number FROM batch_rows WHERE job_id = :job AND prediction_id IS NULL '
                'AND skip_reason IS NULL ORDER BY row_number'
            ),
            {'job': job_id},
        ).scalars().all()
        rows = [
            {'job_id': job_id, 'first_row': numbers[at], 'last_row': numbers[min(at + CHUNK, len(numbers)) - 1],
             'status': 'queued'}
            for at in range(0, len(numbers), CHUNK)
        ]
        if rows:
            op.bulk_insert(chunks, rows)
    bind.execute(sa.text("UPDATE batch_jobs SET worker = NULL WHERE status IN ('queued', 'running')"))


def downgrade():
    # The rows say what is tagged: the release before resumes an open batch from them.
    with op.batch_alter_table('batch_chunks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_chunks_status'))
        batch_op.drop_index('ix_batch_chunks_job_status')

    op.drop_table('batch_chunks')
