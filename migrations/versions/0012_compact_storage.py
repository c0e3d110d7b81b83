"""compact storage (issue 13 point 1): scores as binary in the version's label order, thresholds once per
version, embeddings once per prediction and encoder

First version: the revision in the chain, so later migrations can follow it; the conversion lands next.

Revision ID: 0012_compact_storage
Revises: 0011_current_labels
Create Date: 2026-11-30 09:00:00

"""


# revision identifiers, used by Alembic.
revision = '0012_compact_storage'
down_revision = '0011_current_labels'
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
