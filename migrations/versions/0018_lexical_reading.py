"""prediction results keep the encoder's reading apart from the lexical part's: read_tokens counts the word pieces
the encoder read (it counted the whole text when the head had a lexical part), lexical_whole_text says the head's
lexical part read all of it

Revision ID: 0018_lexical_reading
Revises: 0017_search_vector_inline
Create Date: 2026-12-01 09:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0018_lexical_reading'
down_revision = '0017_search_vector_inline'
branch_labels = None
depends_on = None

# The encoder reads min(total, covered) word pieces of a text, where covered depends on the version's windows alone
# (Manifest.read_tokens), so stored results are corrected per version without the texts: a truncated text (total
# over covered) stored with more than covered was read by a lexical head, one stored with covered was not. Results
# whose text fit the windows keep their figures and lexical_whole_text NULL (the encoder read all of it anyway).
results = sa.table(
    'prediction_results',
    sa.column('model_version_id', sa.String),
    sa.column('read_tokens', sa.Integer),
    sa.column('total_tokens', sa.Integer),
    sa.column('lexical_whole_text', sa.Boolean),
)
versions = sa.table('model_versions', sa.column('id', sa.String), sa.column('manifest', sa.JSON))


def _covered(manifest):
    """The content word pieces a version's windows cover (webapp.serving.bundle.Manifest.read_tokens), or None."""
    if not isinstance(manifest, dict):
        return None
    length = manifest.get('max_length')
    windows, overlap = manifest.get('max_windows', 1), manifest.get('window_overlap', 0)
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (length, windows, overlap)):
        return None
    content = length - 2
    return content + (windows - 1) * (content - overlap)


def upgrade():
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('lexical_whole_text', sa.Boolean(), nullable=True))
    bind = op.get_bind()
    for version_id, manifest in bind.execute(sa.select(versions.c.id, versions.c.manifest)).all():
        covered = _covered(manifest)
        if covered is None:
            continue
        bind.execute(
            sa.update(results)
            .where(
                results.c.model_version_id == version_id,
                results.c.read_tokens.is_not(None),
                results.c.total_tokens > covered,
            )
            .values(lexical_whole_text=results.c.read_tokens > covered, read_tokens=covered)
        )


def downgrade():
    op.execute(
        sa.update(results).where(results.c.lexical_whole_text.is_(True)).values(read_tokens=results.c.total_tokens)
    )
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('lexical_whole_text')
