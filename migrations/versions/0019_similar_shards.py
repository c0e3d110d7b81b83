"""similar papers on SQLite: each space's binary codes are split into 8 shards (a second sqlite-vec partition key, a
hash of the embedding id) in chunks of 4,096, so a search asks each shard for a share of the nearest instead of the
whole space for all of them (sqlite-vec 0.1.9's selection costs k steps per code read); every code is moved into the
new layout, and back on downgrade; nothing on PostgreSQL

Revision ID: 0019_similar_shards
Revises: 0018_lexical_reading
Create Date: 2026-12-02 14:00:00

"""

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = "0019_similar_shards"
down_revision = "0018_lexical_reading"
branch_labels = None
depends_on = None


# The layout, written out here so this migration keeps building what it built whatever the app does later
# (webapp/evidence/similar_index.py reads and extends it): per code width in bits, a vec0 table
# similar_space_codes_<bits> (space text partition key, shard integer partition key, code bit[<bits>], 4,096 codes a
# chunk), rowid = the embedding's id, shard = the top 3 bits of (id * 2654435761) mod 2^32. 0015's layout had no
# shard column and sqlite-vec's default chunks (1,024).
SHARD = "((id * 2654435761) % 4294967296) / 536870912"
SHARDED = "space text partition key, shard integer partition key, code bit[{bits}], chunk_size=4096"
UNSHARDED = "space text partition key, code bit[{bits}]"


def _tables(bind):
    """(name, code width in bits) of the index's vec0 tables."""
    names = (
        bind.execute(
            sa.text(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'similar_space_codes_*' "
                "AND sql LIKE 'CREATE VIRTUAL TABLE%'"
            )
        )
        .scalars()
        .all()
    )
    return [(name, int(name.rsplit("_", 1)[1])) for name in names]


def _relayout(columns, shard):
    """Every index table rebuilt with ``columns``: its rows copied out to a plain temporary table (sqlite-vec cannot
    rename a vec0 table: its shadow tables keep their names), the table made again, the rows copied back in id order
    (by the temporary table's: an ORDER BY on the copy back would sort away ``vec_bit``'s marking of the code)."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for table, bits in _tables(bind):
        bind.execute(sa.text("DROP TABLE IF EXISTS temp.similar_codes_moving"))
        bind.execute(
            sa.text(
                f"CREATE TEMP TABLE similar_codes_moving AS SELECT rowid AS id, space, code FROM {table} ORDER BY rowid"
            )
        )
        bind.execute(sa.text(f"DROP TABLE {table}"))
        bind.execute(sa.text(f"CREATE VIRTUAL TABLE {table} USING vec0({columns.format(bits=bits)})"))
        shard_column, shard_value = (", shard", f", {SHARD}") if shard else ("", "")
        bind.execute(
            sa.text(
                f"INSERT INTO {table} (rowid, space{shard_column}, code) "
                f"SELECT id, space{shard_value}, vec_bit(code) FROM temp.similar_codes_moving"
            )
        )
        bind.execute(sa.text("DROP TABLE temp.similar_codes_moving"))


def upgrade():
    _relayout(SHARDED, shard=True)


def downgrade():
    _relayout(UNSHARDED, shard=False)
