"""Fewer writes per job: two of the five indexes of ``jobs`` go.

Every change of a job's status (claim, move, finish: three to four per job) is a new row version that no
index can skip (status is in ``jobs_active``), so each writes an entry into every index of ``jobs``: with five,
index records were more than half of all WAL (bench/scale.py). Two served no query the others cannot:

- ``jobs_batch_status`` (batch_id, status): every read by batch (counts, results, publishing, cancel, retry)
  starts from ``jobs_batch_key`` (batch_id, key), whose first column is the same.
- ``jobs_task_type`` (task_type, status, tier): the stats read the trigger-kept summary; the learned start tier
  walks the primary key from the newest job. Counting a task type's active jobs (metrics) reads
  ``jobs_active``, which now carries the task type.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

UPGRADE = """
DROP INDEX jobs_batch_status;
DROP INDEX jobs_task_type;
DROP INDEX jobs_active;
CREATE INDEX jobs_active ON jobs (status, stage, tier, task_type) WHERE status IN ('queued', 'running');
"""

DOWNGRADE = """
DROP INDEX jobs_active;
CREATE INDEX jobs_active ON jobs (status, stage, tier) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_task_type ON jobs (task_type, status, tier);
CREATE INDEX jobs_batch_status ON jobs (batch_id, status);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
