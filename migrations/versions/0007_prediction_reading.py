"""prediction results say how they were answered: best guess, off-domain similarity, tokens read of the text

Revision ID: 0007_prediction_reading
Revises: 0006_label_changes
Create Date: 2026-11-29 18:30:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0007_prediction_reading'
down_revision = '0006_label_changes'
branch_labels = None
depends_on = None


# Plain ALTER TABLE on SQLite too (ADD COLUMN; DROP COLUMN needs SQLite 3.35+): batch mode's default there rebuilds
# the table (for the expression defaults, and for any drop), and dropping the old prediction_results under
# predicted_labels' foreign key fails as soon as one prediction is stored.


def upgrade():
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('best_guess', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('domain', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('off_domain', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('read_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('total_tokens', sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table('prediction_results', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('total_tokens')
        batch_op.drop_column('read_tokens')
        batch_op.drop_column('off_domain')
        batch_op.drop_column('domain')
        batch_op.drop_column('best_guess')
