"""What real providers and gateways say about a request, and batches halted by a configuration fault.

attempts (one row per HTTP request, as before):
- ``cached_tokens``: prompt tokens the provider served from its prompt cache
  (``usage.prompt_tokens_details.cached_tokens``), priced at the model's ``cached_input_per_mtok``;
  ``reasoning_tokens``: ``usage.completion_tokens_details.reasoning_tokens`` (already in output_tokens).
- ``choices``: how many choices came back (a backend that ignores ``n`` answers one); NULL before 0007.
- ``refusals``: JSON object sample index → why that sample is not an answer (``{"code": "refused",
  "detail": the refusal text}`` or ``{"code": "content_filter"}``); NULL when none.
- ``request_id``, ``served_model``, ``gateway_cost_usd``: the gateway's request id, the model that actually
  answered, and the gateway's own cost figure, so a user can reconcile the ledger with its bill.

batches:
- ``halted_at``, ``halt_reason``: set when a request of the batch failed in a way no retry or bigger
  model can fix (bad key, unknown model, unsupported parameter: ``on_config_error: halt``). Its jobs wait
  in Postgres; ``cascade retry BATCH`` clears both and resumes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE attempts
    ADD COLUMN cached_tokens integer NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens integer NOT NULL DEFAULT 0,
    ADD COLUMN choices integer,
    ADD COLUMN refusals jsonb,
    ADD COLUMN request_id text,
    ADD COLUMN served_model text,
    ADD COLUMN gateway_cost_usd numeric(24, 12);
ALTER TABLE batches
    ADD COLUMN halted_at timestamptz,
    ADD COLUMN halt_reason text;
""")


def downgrade() -> None:
    op.execute("""
ALTER TABLE batches DROP COLUMN halt_reason, DROP COLUMN halted_at;
ALTER TABLE attempts DROP COLUMN gateway_cost_usd, DROP COLUMN served_model, DROP COLUMN request_id,
    DROP COLUMN refusals, DROP COLUMN choices, DROP COLUMN reasoning_tokens, DROP COLUMN cached_tokens;
""")
