"""attempts.truncated: the samples of an answered request that the model cut off at max_tokens.

A choice whose finish_reason is "length" stopped before its end. Truncated JSON never parses, but a
truncated text answer can look complete, so the validator needs to know: it fails such a sample as
too_long. NULL when no sample of the request was cut; otherwise a JSON array of sample indices.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE attempts ADD COLUMN truncated jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE attempts DROP COLUMN truncated")
