"""full-text search over predictions' titles and abstracts with the database's own engine: an external-content
FTS5 table kept in sync by triggers on SQLite, a stored generated tsvector column with a GIN index on PostgreSQL;
both filled from the rows already stored

Revision ID: 0010_fulltext_search
Revises: 0009_curation_v2
Create Date: 2026-11-29 21:50:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0010_fulltext_search'
down_revision = '0009_curation_v2'
branch_labels = None
depends_on = None


# Names read by webapp/history/search.py: keep them in step.
# A later SQLite batch migration that rebuilds `predictions` drops these triggers: recreate them there.
SQLITE_UPGRADE = [
    # External content: the index holds tokens only, the text stays in `predictions` (no second copy).
    """CREATE VIRTUAL TABLE predictions_fts USING fts5(
        title, abstract, content='predictions', content_rowid='id', tokenize='porter unicode61'
    )""",
    """CREATE TRIGGER predictions_fts_ai AFTER INSERT ON predictions BEGIN
        INSERT INTO predictions_fts(rowid, title, abstract) VALUES (new.id, new.title, new.abstract);
    END""",
    """CREATE TRIGGER predictions_fts_ad AFTER DELETE ON predictions BEGIN
        INSERT INTO predictions_fts(predictions_fts, rowid, title, abstract)
        VALUES ('delete', old.id, old.title, old.abstract);
    END""",
    """CREATE TRIGGER predictions_fts_au AFTER UPDATE OF title, abstract ON predictions BEGIN
        INSERT INTO predictions_fts(predictions_fts, rowid, title, abstract)
        VALUES ('delete', old.id, old.title, old.abstract);
        INSERT INTO predictions_fts(rowid, title, abstract) VALUES (new.id, new.title, new.abstract);
    END""",
    # Backfill: index every row stored before this migration.
    "INSERT INTO predictions_fts(predictions_fts) VALUES ('rebuild')",
]
SQLITE_DOWNGRADE = [
    'DROP TRIGGER IF EXISTS predictions_fts_au',
    'DROP TRIGGER IF EXISTS predictions_fts_ad',
    'DROP TRIGGER IF EXISTS predictions_fts_ai',
    'DROP TABLE IF EXISTS predictions_fts',
]
# A stored generated column is computed for existing rows by the ALTER itself (the backfill) and for new rows on
# insert; the title weighs more (A) than the abstract (B) in ts_rank. "<" and ">" become spaces first: PostgreSQL's
# parser reads "<script>" as an XML tag and indexes no word of it, where FTS5 and the query parser see "script".
POSTGRESQL_UPGRADE = [
    """ALTER TABLE predictions ADD COLUMN search_vector tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, translate(coalesce(title, ''), '<>', '  ')), 'A')
        || setweight(to_tsvector('english'::regconfig, translate(coalesce(abstract, ''), '<>', '  ')), 'B')
    ) STORED""",
    'CREATE INDEX ix_predictions_search_vector ON predictions USING gin (search_vector)',
]
POSTGRESQL_DOWNGRADE = [
    'DROP INDEX IF EXISTS ix_predictions_search_vector',
    'ALTER TABLE predictions DROP COLUMN IF EXISTS search_vector',
]


def _run(statements):
    for statement in statements:
        op.execute(statement)


def upgrade():
    dialect = op.get_bind().dialect.name
    if dialect == 'sqlite':
        _run(SQLITE_UPGRADE)
    elif dialect == 'postgresql':
        _run(POSTGRESQL_UPGRADE)


def downgrade():
    dialect = op.get_bind().dialect.name
    if dialect == 'sqlite':
        _run(SQLITE_DOWNGRADE)
    elif dialect == 'postgresql':
        _run(POSTGRESQL_DOWNGRADE)
