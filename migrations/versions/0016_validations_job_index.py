"""A plain index on ``validations.job_id``.

Since migration 0014 the one index leading with ``job_id`` is partial (the current run's verdicts), and a partial
index cannot serve the foreign key's ``ON DELETE CASCADE``: deleting a batch scanned all of ``validations`` once
per deleted job (a 1M-job batch ran for more than 20 minutes; 22 s with this index).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX validations_job ON validations (job_id)")


def downgrade() -> None:
    op.execute("DROP INDEX validations_job")
