"""Tables eval_runs and eval_results: what `cascade eval` measured, beside production stats.

One eval_runs row per run (a threshold, or one tier alone) of one task type on one dataset; runs of one
`cascade eval` share eval_id. eval_results holds each row's outcome; job_id points into jobs (the run's
batch) for the attempts and validations behind it. Numbers are stored as measured: money is numeric
with 12 decimals, rates are fractions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE eval_runs (
    id text PRIMARY KEY,
    eval_id text NOT NULL,
    task_type text NOT NULL,
    dataset text NOT NULL,
    dataset_hash text NOT NULL,
    label text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('threshold', 'tier')),
    threshold numeric(8, 6),
    tier integer,
    batch_id text REFERENCES batches (id) ON DELETE SET NULL,
    config_hash text NOT NULL,
    rows integer NOT NULL,
    correct integer NOT NULL,
    accuracy numeric(8, 6) NOT NULL,
    escalation_rate numeric(8, 6) NOT NULL,
    tier3_rate numeric(8, 6) NOT NULL,
    cost_usd numeric(24, 12) NOT NULL,
    relative_cost numeric(12, 6),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'threshold') = (threshold IS NOT NULL) AND (kind = 'tier') = (tier IS NOT NULL))
);
CREATE INDEX eval_runs_task_type ON eval_runs (task_type, created_at);
CREATE INDEX eval_runs_eval_id ON eval_runs (eval_id);

CREATE TABLE eval_results (
    run_id text NOT NULL REFERENCES eval_runs (id) ON DELETE CASCADE,
    row_id text NOT NULL,
    job_id bigint REFERENCES jobs (id) ON DELETE SET NULL,
    status text NOT NULL,
    tier integer NOT NULL,
    correct boolean NOT NULL,
    cost_usd numeric(24, 12) NOT NULL,
    calibration boolean NOT NULL,
    gold jsonb,
    output jsonb,
    PRIMARY KEY (run_id, row_id)
);
"""

def upgrade() -> None:
    op.execute(TABLES)


def downgrade() -> None:
    op.execute("DROP TABLE eval_results, eval_runs")
