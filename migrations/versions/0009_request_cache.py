"""Request cache: every answered model request is kept once, keyed by what changes the answer.

- ``request_cache``: one row per request key (``key`` = sha256 of the endpoint, the provider's model id,
  the rendered messages, temperature, max_tokens, response_format, n and the first sample; see
  ``cascade.cache``). ``answer`` holds the choices' contents and finish reasons, with the original tokens
  and cost. A row without an answer is a request in flight: ``flight`` names the claim that sends it,
  ``flight_worker`` its heartbeating worker (a dead worker's flight is taken over), ``flight_at`` when it
  started (a flight older than the lease is taken over whoever owns it). Half of each page is left free so
  that filling in a flight's answer is a HOT update (no index write).
- ``attempts.cached``: the request was answered from the cache (``cost_usd`` 0, the original tokens);
  ``attempts.saved_usd``: what the answer cost when it was first paid for.
- ``cache_stats``: hits, misses (answered requests that went to a model), hit rate and the saved cost per
  task type.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE request_cache (
    key bytea PRIMARY KEY,
    endpoint text NOT NULL,
    model text NOT NULL,
    n integer NOT NULL,
    sample integer NOT NULL,
    answer jsonb,
    input_tokens integer,
    output_tokens integer,
    cached_tokens integer,
    reasoning_tokens integer,
    served_model text,
    cost_usd numeric(24, 12),
    answered_at timestamptz,
    flight text,
    flight_worker text,
    flight_at timestamptz
) WITH (fillfactor = 50);
ALTER TABLE attempts ADD COLUMN cached boolean NOT NULL DEFAULT false,
                     ADD COLUMN saved_usd numeric(24, 12);
CREATE VIEW cache_stats AS
WITH counts AS (
    SELECT j.task_type,
           count(*) FILTER (WHERE a.cached) AS hits,
           count(*) FILTER (WHERE NOT a.cached AND a.error IS NULL) AS misses,
           coalesce(sum(a.saved_usd) FILTER (WHERE a.cached), 0) AS saved_usd
    FROM attempts a JOIN jobs j ON j.id = a.job_id
    GROUP BY j.task_type
)
SELECT task_type, hits, misses,
       CASE WHEN hits + misses > 0 THEN round(hits::numeric / (hits + misses), 4) END AS hit_rate,
       saved_usd
FROM counts;
GRANT SELECT ON cache_stats TO cascade_reader;
""")


def downgrade() -> None:
    op.execute("""
DROP VIEW cache_stats;
ALTER TABLE attempts DROP COLUMN cached, DROP COLUMN saved_usd;
DROP TABLE request_cache;
""")
