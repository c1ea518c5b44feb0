"""Worker heartbeats: a dead worker's jobs come back in seconds, a slow live one keeps its work.

Before, a claimed job was held until its fixed lease (300 s) expired: a kill -9 cost every job the dead
worker held five minutes, and a shorter lease would take slow but healthy requests away from live workers.

- ``workers``: one row per worker process (``id`` is the process's own token), ``seen_at`` refreshed by
  the process every few seconds (``CASCADE_HEARTBEAT_S``). Only ``seen_at`` changes and it is not
  indexed, so the refresh is a HOT update (fillfactor leaves room on the page).
- ``jobs.worker_id``: the process that holds a running job (set by the claim, in the UPDATE that already
  rewrites the row; not indexed). The sweeper takes a running job back when its worker's heartbeat is
  older than ``CASCADE_WORKER_DEAD_AFTER_S``, however long the job has run; a job claimed without a
  worker id (a stage run outside a worker) keeps the old rule, its ``lease_until``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE workers (
    id text PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);
ALTER TABLE jobs ADD COLUMN worker_id text;
""")


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN worker_id; DROP TABLE workers;")
