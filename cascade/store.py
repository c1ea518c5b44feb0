"""PostgreSQL: tables, the job state machine, and the queries the stages and CLI need.

Every state change is one conditional UPDATE (``... WHERE id = :id AND status = :from AND tier = :t
AND stage = :s``); zero rows means another worker already moved the job, so a duplicate or late
message is a no-op. A claim bumps ``claim_no``; the stage's closing UPDATE repeats that number, so a
worker whose lease expired (and whose job the sweeper handed to another worker) cannot move it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    Text,
    create_engine,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "TRANSITIONS",
    "Attempt",
    "Base",
    "Batch",
    "Claim",
    "Job",
    "JobStatus",
    "Stage",
    "Validation",
    "make_engine",
    "normalize_url",
]

MONEY = Numeric(24, 12)


class JobStatus(enum.StrEnum):
    #: waiting for its stage's message (or for ``not_before``)
    QUEUED = "queued"
    #: a worker holds it until ``lease_until``
    RUNNING = "running"
    #: a tier's answer passed validation (or was accepted as the last tier's)
    SUCCEEDED = "succeeded"
    #: every tier failed, or the policy gave up
    FAILED = "failed"


class Stage(enum.StrEnum):
    CALL = "call"
    VALIDATE = "validate"


#: The allowed moves of ``jobs.status``; every UPDATE in this module follows one of them.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    task_type: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    content_hash: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)  # Any: the task snapshot's JSON
    config_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    rows: Mapped[int] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(Text)
    tiers: Mapped[int] = mapped_column(Integer)
    top_input_per_mtok: Mapped[Decimal] = mapped_column(MONEY)
    top_output_per_mtok: Mapped[Decimal] = mapped_column(MONEY)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("jobs_batch_key", "batch_id", "key", unique=True),
        Index("jobs_batch_status", "batch_id", "status"),
        Index("jobs_task_type", "task_type", "status", "tier"),
        Index("jobs_active", "status", "stage", "tier", postgresql_where=text("status IN ('queued', 'running')")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(Text, ForeignKey("batches.id", ondelete="CASCADE"))
    task_type: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)  # Any: the user's row
    status: Mapped[str] = mapped_column(Text, server_default=JobStatus.QUEUED.value)
    tier: Mapped[int] = mapped_column(Integer, server_default="1")
    stage: Mapped[str] = mapped_column(Text, server_default=Stage.CALL.value)
    claim_no: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    output: Mapped[Any | None] = mapped_column(JSONB)  # Any: parsed model output
    error: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (
        Index("attempts_job_tier", "job_id", "tier"),
        # At most one answer that counts per (job, tier, sample): a request repeated after a crash is a retry.
        Index("attempts_answer", "job_id", "tier", "sample", unique=True, postgresql_where=text("error IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("jobs.id", ondelete="CASCADE"))
    tier: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(Text)
    variant: Mapped[str | None] = mapped_column(Text)
    sample: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    output_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(MONEY, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    response: Mapped[list[str | None] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Validation(Base):
    __tablename__ = "validations"
    __table_args__ = (Index("validations_job_tier", "job_id", "tier", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("jobs.id", ondelete="CASCADE"))
    tier: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(Text)
    passed: Mapped[bool] = mapped_column(Boolean)
    reasons: Mapped[list[dict[str, str]]] = mapped_column(JSONB)
    agreement: Mapped[Decimal | None] = mapped_column(Numeric(8, 6))
    votes: Mapped[int] = mapped_column(Integer, server_default="0")
    samples: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


@dataclass(frozen=True)
class Claim:
    """A job a worker now holds for one stage."""

    job_id: int
    batch_id: str
    key: str
    input: dict[str, Any]  # Any: the user's row
    tier: int
    stage: Stage
    claim_no: int


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5, schema: str | None = None, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; ``schema`` sets the search_path (tests give each run its own schema)."""
    args: dict[str, Any] = {"application_name": f"cascade:{schema}" if schema else "cascade"}  # Any: driver args
    if schema:
        args["options"] = f"-csearch_path={schema}"
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        connect_args=args,
    )


def ping(conn: Connection) -> None:
    conn.execute(text("SELECT 1"))


# --- state transitions -------------------------------------------------------------------------

_CLAIM = text("""
UPDATE jobs SET status = 'running', claim_no = claim_no + 1,
                lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
WHERE id = :id AND status = 'queued' AND tier = :tier AND stage = :stage
  AND (not_before IS NULL OR not_before <= now())
RETURNING id, batch_id, key, input, tier, stage, claim_no
""")


def claim(conn: Connection, job_id: int, tier: int, stage: Stage, lease_s: float) -> Claim | None:
    """Take job ``job_id`` for (tier, stage). None when it already moved on (a duplicate message)."""
    row = conn.execute(_CLAIM, {"id": job_id, "tier": tier, "stage": stage.value, "lease_s": lease_s}).first()
    if row is None:
        return None
    return Claim(row.id, row.batch_id, row.key, row.input, row.tier, Stage(row.stage), row.claim_no)


_MOVE = text("""
UPDATE jobs SET status = :status, tier = :tier, stage = :stage, lease_until = NULL,
                not_before = CASE WHEN :delay_s > 0 THEN now() + make_interval(secs => :delay_s) END,
                published_at = CASE WHEN :delay_s > 0 THEN NULL ELSE now() END,
                output = CAST(:output AS jsonb), error = :error,
                cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = :id),
                finished_at = CASE WHEN :status IN ('succeeded', 'failed') THEN now() END
WHERE id = :id AND status = 'running' AND claim_no = :claim_no
""")


def move(
    conn: Connection,
    held: Claim,
    *,
    status: JobStatus,
    tier: int,
    stage: Stage,
    output_json: str | None = None,
    error: str | None = None,
    delay_s: float = 0.0,
) -> bool:
    """End a claim: the job goes to (status, tier, stage). False if the claim was lost (lease expired)."""
    assert status in TRANSITIONS[JobStatus.RUNNING], status
    params = {
        "id": held.job_id, "claim_no": held.claim_no, "status": status.value, "tier": tier,
        "stage": stage.value, "output": output_json, "error": error, "delay_s": delay_s,
    }
    return conn.execute(_MOVE, params).rowcount == 1


def batch_config(conn: Connection, batch_id: str) -> dict[str, Any]:  # Any: snapshot JSON
    return dict(conn.execute(text("SELECT config FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one())


# --- attempts -----------------------------------------------------------------------------------

IN_FLIGHT = "in_flight"
INTERRUPTED = "interrupted"


def prepare_attempts(conn: Connection, held: Claim) -> set[int]:
    """Mark requests of earlier claims that never finished as interrupted; return answered samples."""
    conn.execute(
        text("UPDATE attempts SET error = :interrupted WHERE job_id = :id AND tier = :tier AND error = :in_flight"),
        {"id": held.job_id, "tier": held.tier, "interrupted": INTERRUPTED, "in_flight": IN_FLIGHT},
    )
    rows = conn.execute(
        text("SELECT sample, n FROM attempts WHERE job_id = :id AND tier = :tier AND error IS NULL"),
        {"id": held.job_id, "tier": held.tier},
    )
    return {sample + i for sample, n in rows for i in range(n)}


_NEW_ATTEMPT = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error)
VALUES (:job_id, :tier, :model, :variant, :sample, :n, 'in_flight') RETURNING id
""")


def start_attempt(conn: Connection, job_id: int, tier: int, model: str, variant: str | None,
                  sample: int, n: int) -> int:
    """Insert the row of a request about to go out (so its spend stays visible if we crash)."""
    params = {"job_id": job_id, "tier": tier, "model": model, "variant": variant, "sample": sample, "n": n}
    return int(conn.execute(_NEW_ATTEMPT, params).scalar_one())


_END_ATTEMPT = text("""
UPDATE attempts SET latency_ms = :latency_ms, input_tokens = :input_tokens, output_tokens = :output_tokens,
                    cost_usd = :cost_usd, error = :error, detail = :detail, response = CAST(:response AS jsonb)
WHERE id = :id
""")


def end_attempts(conn: Connection, rows: list[dict[str, Any]]) -> None:  # Any: bound parameters
    """Record the outcome of requests (keys: id, latency_ms, input/output_tokens, cost_usd, error, detail,
    response as JSON text)."""
    if rows:
        conn.execute(_END_ATTEMPT, rows)


def answers(conn: Connection, job_id: int, tier: int) -> dict[int, str | None]:
    """Sample index → content, from the requests whose answers count."""
    rows = conn.execute(
        text("SELECT sample, response FROM attempts WHERE job_id = :id AND tier = :tier AND error IS NULL"),
        {"id": job_id, "tier": tier},
    )
    out: dict[int, str | None] = {}
    for sample, response in rows:
        for i, content in enumerate(response or []):
            out[sample + i] = content
    return out


_VALIDATION = text("""
INSERT INTO validations (job_id, tier, model, passed, reasons, agreement, votes, samples)
VALUES (:job_id, :tier, :model, :passed, CAST(:reasons AS jsonb), :agreement, :votes, :samples)
ON CONFLICT (job_id, tier) DO NOTHING
""")


def record_validation(conn: Connection, params: dict[str, Any]) -> None:  # Any: bound parameters
    conn.execute(_VALIDATION, params)


# --- values Postgres accepts -------------------------------------------------------------------


def pg_text(value: str) -> str:
    """Text Postgres accepts: no NUL character, no lone surrogate (either one fails the whole transaction)."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd")


def pg_json(value: Any) -> Any:  # Any: a parsed JSON value
    """A JSON value jsonb accepts (strings and keys as in ``pg_text``)."""
    if isinstance(value, str):
        return pg_text(value)
    if isinstance(value, list):
        return [pg_json(item) for item in value]
    if isinstance(value, dict):
        return {pg_text(str(key)): pg_json(item) for key, item in value.items()}
    return value
