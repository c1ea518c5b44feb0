"""Batch control: cancel a batch, re-run its failed rows, and a batch's budget cap that a retry can raise.

- ``jobs.status`` may be ``cancelled``: a queued job of a cancelled batch (deferred ones too) at once; a
  running one when its stage ends (its requests in flight are recorded; no new request goes out).
- ``batches.cancelled_at``: when ``cascade cancel`` stopped the batch (NULL: it runs).
- ``batches.max_cost_usd``: the batch's cap on spend as it stands (``--max-cost`` at submission, raised by
  ``cascade retry --failed --max-cost``); the budget reads it instead of the snapshot's.
- ``attempts.superseded`` and ``validations.superseded``: the requests and verdicts of an earlier run of a job
  that ``cascade retry --failed`` ran again, kept as history (their cost stays in the job's): they are never
  its answers, its retries' count or its current verdict (one per job and tier).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')) NOT VALID;
ALTER TABLE jobs VALIDATE CONSTRAINT jobs_status_check;

ALTER TABLE batches ADD COLUMN cancelled_at timestamptz,
                    ADD COLUMN max_cost_usd numeric(24, 12);
UPDATE batches SET max_cost_usd = (config ->> 'max_cost_usd')::numeric WHERE config ->> 'max_cost_usd' IS NOT NULL;

ALTER TABLE validations ADD COLUMN superseded boolean NOT NULL DEFAULT false;
DROP INDEX validations_job_tier;
CREATE UNIQUE INDEX validations_job_tier ON validations (job_id, tier) WHERE NOT superseded;
ALTER TABLE attempts ADD COLUMN superseded boolean NOT NULL DEFAULT false;
DROP INDEX attempts_answer;
CREATE UNIQUE INDEX attempts_answer ON attempts (job_id, tier, sample) WHERE error IS NULL AND NOT superseded;
"""

DOWNGRADE = """
DROP INDEX attempts_answer;
UPDATE attempts SET error = 'superseded' WHERE superseded AND error IS NULL;
CREATE UNIQUE INDEX attempts_answer ON attempts (job_id, tier, sample) WHERE error IS NULL;
ALTER TABLE attempts DROP COLUMN superseded;
DROP INDEX validations_job_tier;
DELETE FROM validations WHERE superseded;
CREATE UNIQUE INDEX validations_job_tier ON validations (job_id, tier);
ALTER TABLE validations DROP COLUMN superseded;
ALTER TABLE batches DROP COLUMN cancelled_at, DROP COLUMN max_cost_usd;
UPDATE jobs SET status = 'failed', error = coalesce(error, 'cancelled') WHERE status = 'cancelled';
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed'));
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
