"""PostgreSQL: every statement cascade runs on its tables (the Alembic migrations own the schema).

Every state change is one conditional UPDATE (``... WHERE id = :id AND status = :from AND tier = :t
AND stage = :s``); zero rows means another worker already moved the job, so a duplicate or late
message is a no-op. A claim bumps ``claim_no``; the stage's closing UPDATE repeats that number, so a
worker whose lease expired (and whose job the sweeper handed to another worker) cannot move it.

Modules: ``jobs`` (the state machine), ``attempts`` (requests and verdicts), ``batches`` (submitting and
reading batches), ``sweep`` (the sweeper's statements), ``reports`` (the stats view, evaluation runs),
``values`` (text and JSON Postgres accepts) and ``engine``. Callers use this package's names
(``store.claim``), not the modules. A database error that means something is translated here, once, into
``cascade.errors`` (``IdempotencyKeyTaken``, ``DuplicateKey``); the rest propagate as SQLAlchemy's own,
which ``database_errors()`` names for loops that retry.
"""

from cascade.store.attempts import (
    IN_FLIGHT,
    INTERRUPTED,
    Answers,
    History,
    NewAttempt,
    answers_many,
    end_attempts,
    lock_for_settling,
    lock_held_job,
    prepare_attempts,
    record_validations,
    start_attempts,
    start_held_attempt,
)
from cascade.store.batches import (
    JobResult,
    NewBatch,
    batch_by_key,
    batch_cache_use,
    batch_config,
    batch_rows,
    copy_jobs,
    count_finished,
    count_jobs,
    count_jobs_by_stage,
    count_jobs_by_tier,
    finish_batch,
    halt_batch,
    insert_batch,
    job_results,
    match_batch_ids,
    max_tiers,
    models_ignoring_n,
    queued_calls,
    resume_batch,
)
from cascade.store.budget import (
    batch_budget,
    budget_used,
    reserve_budget,
    reserve_daily,
    settle_budget,
    settle_daily,
    settle_daily_now,
)
from cascade.store.engine import database_errors, make_engine, normalize_url
from cascade.store.jobs import TRANSITIONS, Claim, JobStatus, Move, Stage, claim, move_many, release, renew_leases
from cascade.store.reports import count_eval_batches, escalation_stats, escalation_stats_of, record_eval_run
from cascade.store.sweep import (
    forget_workers,
    release_sweep_lock,
    stamp_deferred_due,
    stamp_stalled,
    take_back_expired,
    take_sweep_lock,
    waiting_jobs,
)
from cascade.store.values import pg_json, pg_text

__all__ = [
    "INTERRUPTED",
    "IN_FLIGHT",
    "TRANSITIONS",
    "Answers",
    "Claim",
    "History",
    "JobResult",
    "JobStatus",
    "Move",
    "NewAttempt",
    "NewBatch",
    "Stage",
    "answers_many",
    "batch_budget",
    "batch_by_key",
    "batch_cache_use",
    "batch_config",
    "batch_rows",
    "budget_used",
    "claim",
    "copy_jobs",
    "count_eval_batches",
    "count_finished",
    "count_jobs",
    "count_jobs_by_stage",
    "count_jobs_by_tier",
    "database_errors",
    "end_attempts",
    "escalation_stats",
    "escalation_stats_of",
    "finish_batch",
    "forget_workers",
    "halt_batch",
    "insert_batch",
    "job_results",
    "lock_for_settling",
    "lock_held_job",
    "make_engine",
    "match_batch_ids",
    "max_tiers",
    "models_ignoring_n",
    "move_many",
    "normalize_url",
    "pg_json",
    "pg_text",
    "prepare_attempts",
    "queued_calls",
    "record_eval_run",
    "record_validations",
    "release",
    "release_sweep_lock",
    "renew_leases",
    "reserve_budget",
    "reserve_daily",
    "resume_batch",
    "settle_budget",
    "settle_daily",
    "settle_daily_now",
    "stamp_deferred_due",
    "stamp_stalled",
    "start_attempts",
    "start_held_attempt",
    "take_back_expired",
    "take_sweep_lock",
    "waiting_jobs",
]
