"""Start tiers: a job may start above tier 1 (a routing rule, or the start tier learned from history).

- ``jobs.start_tier``: the tier the job was first published to (1 unless a ``route:`` rule or
  ``routing: {start: learned}`` chose another); ``jobs.route``: what chose it (``route[i]`` or the rule's
  name, ``learned``, ``explore``; NULL: the default, tier 1).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE jobs ADD COLUMN start_tier integer NOT NULL DEFAULT 1 CHECK (start_tier >= 1),
                 ADD COLUMN route text;
"""

DOWNGRADE = """
ALTER TABLE jobs DROP COLUMN start_tier, DROP COLUMN route;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
