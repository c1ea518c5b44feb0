"""Daily budgets: a task type's spend over any 24 hours stays under its ``budget: {per_day_usd: X}``.

``task_budgets``: per task type and hour, what its requests cost (``spent_usd``) and what those in flight may
still cost (``reserved_usd``), in the hour their reservation was made (``attempts.created_at``'s hour). A
reservation sums the buckets of the last 24 hours, plus the one the window starts in (so the sum is never less
than the rolling 24 hours' spend), under a per-task-type advisory lock, and adds to the current hour's bucket.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE task_budgets (
    task_type text NOT NULL,
    hour timestamptz NOT NULL,
    spent_usd numeric(24, 12) NOT NULL DEFAULT 0,
    reserved_usd numeric(24, 12) NOT NULL DEFAULT 0,
    PRIMARY KEY (task_type, hour)
);
""")


def downgrade() -> None:
    op.execute("DROP TABLE task_budgets")
