"""PostgreSQL keeps each prediction's full-text vector in the row (storage MAIN) and moves the abstract out of line
instead, so a search that tests the newest rows one by one reads their pages, not a TOAST lookup per row; rows stored
before keep their layout until the table is rewritten (``VACUUM FULL predictions``, README "At scale"); nothing on
SQLite

Revision ID: 0017_search_vector_inline
Revises: 0016_covering_label_indexes
Create Date: 2026-11-30 07:40:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0017_search_vector_inline'
down_revision = '0016_covering_label_indexes'
branch_labels = None
depends_on = None

# A row holds its title, abstract (about 1.1 KB compressed) and the abstract's tsvector (about 1.6 KB): over
# PostgreSQL's 2 KB threshold, the largest value went out of line, the tsvector. A search's walk down the newest rows
# (webapp/history/search.py) then read four buffers a row, the TOAST index and chunks: 0.1-3.3 s for a two-word search at a
# million when those pages had left the cache, against 25-115 ms with the vectors in the rows (bench/scale.py).
# The migration does not rewrite the table: that would lock it for minutes at a million rows during a deploy, and
# the walk reads the newest rows first, which every new prediction now stores this way.


def upgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE predictions ALTER COLUMN search_vector SET STORAGE MAIN')


def downgrade():
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE predictions ALTER COLUMN search_vector SET STORAGE EXTENDED')
