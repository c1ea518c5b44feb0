"""Budgets: a batch's spend never exceeds its cap; a request lost in a crash keeps an estimate of its cost.

- ``attempts.reserved_usd``: the upper bound of the request's cost, written before it goes out (prompt tokens
  at most its UTF-8 bytes plus a small overhead per message, completion at most ``max_tokens`` × n, at the
  model's prices). ``attempts.cost_estimated``: the request never came back (``interrupted``: its worker died
  or lost its claim) and ``cost_usd`` holds that bound, so the ledger never counts less than was spent; a late
  answer replaces it with the real cost.
- ``batches.spent_usd`` and ``batches.reserved_usd``: for a batch submitted with a cap (``--max-cost``, kept
  in its snapshot), what its requests cost and what the requests in flight may still cost. A request goes out
  only after one conditional UPDATE reserved its bound within the cap (``spent + reserved + bound <= cap``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE attempts ADD COLUMN reserved_usd numeric(24, 12),
                     ADD COLUMN cost_estimated boolean NOT NULL DEFAULT false;
ALTER TABLE batches ADD COLUMN spent_usd numeric(24, 12) NOT NULL DEFAULT 0,
                    ADD COLUMN reserved_usd numeric(24, 12) NOT NULL DEFAULT 0;
""")


def downgrade() -> None:
    op.execute("""
ALTER TABLE batches DROP COLUMN spent_usd, DROP COLUMN reserved_usd;
ALTER TABLE attempts DROP COLUMN reserved_usd, DROP COLUMN cost_estimated;
""")
