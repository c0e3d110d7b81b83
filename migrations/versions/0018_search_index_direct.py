"""PostgreSQL writes each prediction's words straight into the full-text GIN index (``fastupdate`` off) instead of
a pending list merged later; nothing on SQLite

Revision ID: 0018_search_index_direct
Revises: 0017_search_vector_inline
Create Date: 2026-12-01 05:00:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0018_search_index_direct'
down_revision = '0017_search_vector_inline'
branch_labels = None
depends_on = None

# With the pending list (GIN's default), new rows' words wait in an unsorted list that every search reads in full,
# and an insert now and then merges up to 4 MB of it into the index; the merged pages were left about half full: the
# index took about 930 bytes a prediction, against about 500 written directly, for about 0.5 ms more of the server's
# time per stored prediction (bench/storage.py, README "At scale"). The pending list is merged here; the space it
# took comes back with ``REINDEX INDEX CONCURRENTLY ix_predictions_search_vector``, which a deploy does not run (at a
# million rows it takes minutes).
INDEX = 'ix_predictions_search_vector'


def upgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER INDEX {INDEX} SET (fastupdate = off)')
        op.execute(f"SELECT gin_clean_pending_list('{INDEX}'::regclass)")


def downgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f'ALTER INDEX {INDEX} RESET (fastupdate)')
