"""PostgreSQL: the job state machine and the queries the stages and CLI need (the Alembic migrations own the schema).

Every state change is one conditional UPDATE (``... WHERE id = :id AND status = :from AND tier = :t
AND stage = :s``); zero rows means another worker already moved the job, so a duplicate or late
message is a no-op. A claim bumps ``claim_no``; the stage's closing UPDATE repeats that number, so a
worker whose lease expired (and whose job the sweeper handed to another worker) cannot move it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text

from cascade.errors import IllegalTransition

__all__ = [
    "TRANSITIONS",
    "Answers",
    "Claim",
    "History",
    "JobStatus",
    "Move",
    "NewAttempt",
    "Stage",
    "make_engine",
    "normalize_url",
]


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


# --- state transitions -------------------------------------------------------------------------

# SKIP LOCKED: a job locked by another transaction (a sweep re-publishing it, a claim of a duplicate message,
# a frozen worker's open transaction) is left to its holder instead of stalling this worker's slot; if it
# is still due afterwards, its own message or the sweeper brings it back.
_CLAIM = text("""
UPDATE jobs SET status = 'running', claim_no = claim_no + 1, worker_id = :worker_id,
                lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
WHERE id IN (SELECT id FROM jobs
             WHERE id = ANY(:ids) AND status = 'queued' AND tier = :tier AND stage = :stage
               AND (not_before IS NULL OR not_before <= now())
             FOR UPDATE SKIP LOCKED)
RETURNING id, batch_id, key, input, tier, stage, claim_no
""")


def claim(conn: Connection, job_ids: Sequence[int], tier: int, stage: Stage, lease_s: float,
          worker_id: str | None = None) -> list[Claim]:
    """Take the jobs of ``job_ids`` that are due at (tier, stage), in one statement; the others already moved
    on (a duplicate or late message) and are left alone. ``worker_id`` names the heartbeating process that
    holds them (``cascade.liveness``); without one, only ``lease_s`` protects the claim."""
    rows = conn.execute(_CLAIM, {"ids": list(job_ids), "tier": tier, "stage": stage.value, "lease_s": lease_s,
                                 "worker_id": worker_id})
    return sorted((Claim(r.id, r.batch_id, r.key, r.input, r.tier, Stage(r.stage), r.claim_no) for r in rows),
                  key=lambda c: c.job_id)


@dataclass(frozen=True)
class Move:
    """How a claim ends: the job goes to (status, tier, stage); ``delay_s`` > 0 holds it in Postgres that long."""

    held: Claim
    status: JobStatus
    tier: int
    stage: Stage
    output_json: str | None = None
    error: str | None = None
    delay_s: float = 0.0


_MOVE = text("""
UPDATE jobs j SET status = m.status, tier = m.tier, stage = m.stage, lease_until = NULL,
                  not_before = CASE WHEN m.delay_s > 0 THEN now() + make_interval(secs => m.delay_s) END,
                  published_at = CASE WHEN m.delay_s > 0 THEN NULL ELSE now() END,
                  output = CAST(m.output AS jsonb), error = m.error,
                  cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = m.id),
                  finished_at = CASE WHEN m.status IN ('succeeded', 'failed') THEN now() END
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[]), CAST(:statuses AS text[]), CAST(:tiers AS int[]),
            CAST(:stages AS text[]), CAST(:outputs AS text[]), CAST(:errors AS text[]),
            CAST(:delays AS float8[])) AS m(id, claim_no, status, tier, stage, output, error, delay_s)
WHERE j.id = m.id AND j.status = 'running' AND j.claim_no = m.claim_no
RETURNING j.id
""")


def move_many(conn: Connection, moves: Sequence[Move]) -> set[int]:
    """End claims in one statement; returns the ids that moved (a claim whose lease expired and was taken
    over by another worker does not).

    Raises:
        IllegalTransition: a move leaves ``running`` for a status ``TRANSITIONS`` does not allow; nothing moves.
    """
    if not moves:
        return set()
    for m in moves:
        # A real check, not an assert: `python -O` strips asserts, and a wrong move must never reach the table.
        if m.status not in TRANSITIONS[JobStatus.RUNNING]:
            raise IllegalTransition(m.held.job_id, JobStatus.RUNNING, m.status)
    params = {
        "ids": [m.held.job_id for m in moves], "claim_nos": [m.held.claim_no for m in moves],
        "statuses": [m.status.value for m in moves], "tiers": [m.tier for m in moves],
        "stages": [m.stage.value for m in moves], "outputs": [m.output_json for m in moves],
        "errors": [m.error for m in moves], "delays": [float(m.delay_s) for m in moves],
    }
    return {job_id for (job_id,) in conn.execute(_MOVE, params)}


_RELEASE = text("""
UPDATE jobs j SET status = 'queued', lease_until = NULL, published_at = now()
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[])) AS c(id, claim_no)
WHERE j.id = c.id AND j.claim_no = c.claim_no AND j.status = 'running'
RETURNING j.id, j.tier, j.stage
""")


def release(conn: Connection, claims: Sequence[Claim]) -> list[tuple[int, int, Stage]]:
    """Hand claims back to their queue unchanged (the stage could not finish them); returns the (job, tier,
    stage)s to publish. A claim that already moved, or was taken over, is left alone."""
    rows = conn.execute(_RELEASE, {"ids": [c.job_id for c in claims], "claim_nos": [c.claim_no for c in claims]})
    return [(job_id, tier, Stage(stage)) for job_id, tier, stage in rows]


def batch_config(conn: Connection, batch_id: str) -> dict[str, Any]:  # Any: snapshot JSON
    return dict(conn.execute(text("SELECT config FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one())


# --- attempts -----------------------------------------------------------------------------------

IN_FLIGHT = "in_flight"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class History:
    """A claimed job's earlier requests at its tier: samples answered, and failed requests per group
    ``(sample, n, rate_limited)`` (a deferred retry continues its backoff instead of starting over)."""

    answered: frozenset[int]
    failures: dict[tuple[int, int, bool], int]


_INTERRUPT = text("""
UPDATE attempts SET error = 'interrupted' WHERE job_id = ANY(:ids) AND tier = :tier AND error = 'in_flight'
""")
_HISTORY = text("""
SELECT job_id, sample, n, error FROM attempts
WHERE job_id = ANY(:ids) AND tier = :tier AND (error IS NULL OR error NOT IN ('in_flight', 'interrupted'))
""")


def prepare_attempts(conn: Connection, claims: Sequence[Claim], tier: int) -> dict[int, History]:
    """Mark requests of earlier claims that never finished as interrupted; return each job's history."""
    ids = [c.job_id for c in claims]
    conn.execute(_INTERRUPT, {"ids": ids, "tier": tier})
    answered: dict[int, set[int]] = {i: set() for i in ids}
    failures: dict[int, dict[tuple[int, int, bool], int]] = {i: {} for i in ids}
    for job_id, sample, n, error in conn.execute(_HISTORY, {"ids": ids, "tier": tier}):
        if error is None:
            answered[job_id].update(range(sample, sample + n))
        else:
            key = (sample, n, error == "rate_limited")
            failures[job_id][key] = failures[job_id].get(key, 0) + 1
    return {i: History(frozenset(answered[i]), failures[i]) for i in ids}


@dataclass(frozen=True)
class NewAttempt:
    job_id: int
    tier: int
    model: str
    variant: str | None
    sample: int
    n: int


_NEW_ATTEMPTS = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error)
SELECT job_id, tier, model, variant, sample, n, 'in_flight'
FROM unnest(CAST(:job_ids AS bigint[]), CAST(:tiers AS int[]), CAST(:models AS text[]), CAST(:variants AS text[]),
            CAST(:samples AS int[]), CAST(:ns AS int[])) AS a(job_id, tier, model, variant, sample, n)
RETURNING id, job_id, tier, sample
""")


def start_attempts(conn: Connection, new: Sequence[NewAttempt]) -> list[int]:
    """Insert the rows of requests about to go out (so their spend stays visible if we crash), in one
    statement; returns their ids in the order given. The requests of one call are distinct (job, tier,
    sample)s: groups of a tier never share a first sample."""
    if not new:
        return []
    params = {"job_ids": [a.job_id for a in new], "tiers": [a.tier for a in new], "models": [a.model for a in new],
              "variants": [a.variant for a in new], "samples": [a.sample for a in new], "ns": [a.n for a in new]}
    ids = {(job_id, tier, sample): int(i) for i, job_id, tier, sample in conn.execute(_NEW_ATTEMPTS, params)}
    return [ids[(a.job_id, a.tier, a.sample)] for a in new]


_HELD_ATTEMPT = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error)
SELECT id, :tier, :model, :variant, :sample, :n, 'in_flight' FROM jobs
WHERE id = :job_id AND status = 'running' AND claim_no = :claim_no
FOR SHARE
RETURNING id
""")


def start_held_attempt(conn: Connection, held: Claim, model: str, variant: str | None, sample: int,
                       n: int) -> int | None:
    """Insert the row of one request about to go out, if ``held`` is still this worker's claim; None when the
    job was taken over (the worker froze or lost Postgres for longer than the dead-after bound): its request
    must not go out. The row lock orders this against a takeover, whose claim then marks the row interrupted."""
    row = conn.execute(_HELD_ATTEMPT, {"job_id": held.job_id, "claim_no": held.claim_no, "tier": held.tier,
                                       "model": model, "variant": variant, "sample": sample, "n": n}).first()
    return None if row is None else int(row.id)


# A row marked interrupted meanwhile belongs to a claim that was taken over (its worker froze past the
# dead-after bound, then resumed): its tokens and cost are recorded (the provider billed them) but its
# error stays, so it never counts as an answer beside the new claim's.
_END_ATTEMPTS = text("""
UPDATE attempts a SET latency_ms = e.latency_ms, input_tokens = e.input_tokens, output_tokens = e.output_tokens,
                      cost_usd = e.cost_usd,
                      error = CASE WHEN a.error = 'in_flight' THEN e.error ELSE a.error END,
                      detail = CASE WHEN a.error = 'in_flight' THEN e.detail
                                    ELSE 'came back after the job was taken over: ' || coalesce(e.error, 'answer') END,
                      response = CAST(e.response AS jsonb), truncated = CAST(e.truncated AS jsonb)
FROM unnest(CAST(:ids AS bigint[]), CAST(:latency_ms AS int[]), CAST(:input_tokens AS int[]),
            CAST(:output_tokens AS int[]), CAST(:cost_usd AS numeric[]), CAST(:error AS text[]),
            CAST(:detail AS text[]), CAST(:response AS text[]), CAST(:truncated AS text[]))
     AS e(id, latency_ms, input_tokens, output_tokens, cost_usd, error, detail, response, truncated)
WHERE a.id = e.id AND a.error IN ('in_flight', 'interrupted')
RETURNING a.job_id, a.error = 'interrupted' AS late
""")
_END_FIELDS = ("latency_ms", "input_tokens", "output_tokens", "cost_usd", "error", "detail", "response", "truncated")
# A late answer's cost joins its job's total at once (a job that already finished is not moved again).
_RECOST = text("""
UPDATE jobs SET cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = jobs.id)
WHERE id = ANY(:ids)
""")


def end_attempts(conn: Connection, rows: list[dict[str, Any]]) -> None:  # Any: bound parameters
    """Record the outcome of requests (keys: id, latency_ms, input/output_tokens, cost_usd, error, detail,
    response and truncated as JSON text or None; truncated may be left out) in one statement. A request
    whose claim was taken over meanwhile stays ``interrupted``, with its cost added to its job."""
    if rows:
        params: dict[str, list[Any]] = {"ids": [r["id"] for r in rows]}  # Any: column values
        params.update({name: [r.get(name) for r in rows] for name in _END_FIELDS})
        late = {job_id for job_id, is_late in conn.execute(_END_ATTEMPTS, params) if is_late}
        if late:
            conn.execute(_RECOST, {"ids": sorted(late)})


_ANSWERS = text("""
SELECT job_id, sample, response, truncated FROM attempts WHERE job_id = ANY(:ids) AND tier = :tier AND error IS NULL
""")


@dataclass
class Answers:
    """A job's counted answers at one tier: sample index → content, and the samples cut off at max_tokens."""

    contents: dict[int, str | None]
    truncated: set[int]


def answers_many(conn: Connection, job_ids: Sequence[int], tier: int) -> dict[int, Answers]:
    """Per job: the answers of the requests that count."""
    out = {i: Answers({}, set()) for i in job_ids}
    for job_id, sample, response, truncated in conn.execute(_ANSWERS, {"ids": list(job_ids), "tier": tier}):
        for i, content in enumerate(response or []):
            out[job_id].contents[sample + i] = content
        out[job_id].truncated.update(truncated or [])
    return out


_VALIDATION = text("""
INSERT INTO validations (job_id, tier, model, passed, reasons, agreement, votes, samples)
VALUES (:job_id, :tier, :model, :passed, CAST(:reasons AS jsonb), :agreement, :votes, :samples)
ON CONFLICT (job_id, tier) DO NOTHING
""")


def record_validations(conn: Connection, rows: list[dict[str, Any]]) -> None:  # Any: bound parameters
    """Insert verdicts (one per job and tier: a repeated one is ignored); pipelined in one round trip."""
    if rows:
        conn.execute(_VALIDATION, rows)


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
