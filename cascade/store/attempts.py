"""Requests to models (``attempts``) and the verdicts on their answers (``validations``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from cascade.store.cache import FILL_SQL, Fill, fill_keys, fill_param
from cascade.store.jobs import Claim

__all__ = [
    "INTERRUPTED",
    "IN_FLIGHT",
    "Answers",
    "History",
    "NewAttempt",
    "answers_many",
    "end_attempts",
    "lock_for_settling",
    "lock_held_job",
    "prepare_attempts",
    "record_validations",
    "start_attempts",
    "start_held_attempt",
]

IN_FLIGHT = "in_flight"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class History:
    """A claimed job's earlier requests at its tier: samples answered, and failed requests per group
    ``(sample, n, rate_limited)`` (a deferred retry continues its backoff instead of starting over)."""

    answered: frozenset[int]
    failures: dict[tuple[int, int, bool], int]
    #: the cost bounds of this job's requests just marked interrupted (now counted as their estimated cost)
    estimated: Decimal = Decimal(0)
    #: those requests: (attempt id, bound)
    interrupted: tuple[tuple[int, Decimal], ...] = ()


# A request that never came back was probably billed: it keeps its cost bound as an estimate.
_INTERRUPT = text("""
UPDATE attempts SET error = 'interrupted', cost_usd = coalesce(reserved_usd, 0), cost_estimated = coalesce(reserved_usd, 0) > 0
WHERE job_id = ANY(:ids) AND tier = :tier AND error = 'in_flight' AND NOT superseded
RETURNING id, job_id, coalesce(reserved_usd, 0) AS estimate
""")
# An answer covers the choices that came back (a backend that ignores n answers fewer than it was asked).
_HISTORY = text("""
SELECT job_id, sample, n, coalesce(choices, n) AS answered, error FROM attempts
WHERE job_id = ANY(:ids) AND tier = :tier AND (error IS NULL OR error NOT IN ('in_flight', 'interrupted'))
  AND NOT superseded
""")


def prepare_attempts(conn: Connection, claims: Sequence[Claim], tier: int) -> dict[int, History]:
    """Mark requests of earlier claims that never finished as interrupted; return each job's history."""
    ids = [c.job_id for c in claims]
    estimated: dict[int, Decimal] = {}
    interrupted: dict[int, list[tuple[int, Decimal]]] = {}
    for attempt_id, job_id, estimate in conn.execute(_INTERRUPT, {"ids": ids, "tier": tier}):
        estimated[job_id] = estimated.get(job_id, Decimal(0)) + estimate
        interrupted.setdefault(job_id, []).append((int(attempt_id), Decimal(estimate)))
    answered: dict[int, set[int]] = {i: set() for i in ids}
    failures: dict[int, dict[tuple[int, int, bool], int]] = {i: {} for i in ids}
    for job_id, sample, n, returned, error in conn.execute(_HISTORY, {"ids": ids, "tier": tier}):
        if error is None:
            answered[job_id].update(range(sample, sample + returned))
        else:
            key = (sample, n, error == "rate_limited")
            failures[job_id][key] = failures[job_id].get(key, 0) + 1
    return {i: History(frozenset(answered[i]), failures[i], estimated.get(i, Decimal(0)),
                       tuple(interrupted.get(i, ()))) for i in ids}


@dataclass(frozen=True)
class NewAttempt:
    job_id: int
    tier: int
    model: str
    variant: str | None
    sample: int
    n: int
    reserved_usd: Decimal | None = None  # the upper bound of its cost
    audit: bool = False  # audit work (``cascade.stages.audit``), recorded at tier 0


_NEW_ATTEMPTS = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error, reserved_usd, audit)
SELECT job_id, tier, model, variant, sample, n, 'in_flight', reserved_usd, audit
FROM unnest(CAST(:job_ids AS bigint[]), CAST(:tiers AS int[]), CAST(:models AS text[]), CAST(:variants AS text[]),
            CAST(:samples AS int[]), CAST(:ns AS int[]), CAST(:reserved AS numeric[]), CAST(:audit AS boolean[]))
     AS a(job_id, tier, model, variant, sample, n, reserved_usd, audit)
RETURNING id, job_id, tier, sample
""")


def start_attempts(conn: Connection, new: Sequence[NewAttempt]) -> list[int]:
    """Insert the rows of requests about to go out (so their spend stays visible if we crash), in one
    statement; returns their ids in the order given. The requests of one call are distinct (job, tier,
    sample)s: groups of a tier never share a first sample."""
    if not new:
        return []
    params = {"job_ids": [a.job_id for a in new], "tiers": [a.tier for a in new], "models": [a.model for a in new],
              "variants": [a.variant for a in new], "samples": [a.sample for a in new], "ns": [a.n for a in new],
              "reserved": [a.reserved_usd for a in new], "audit": [a.audit for a in new]}
    ids = {(job_id, tier, sample): int(i) for i, job_id, tier, sample in conn.execute(_NEW_ATTEMPTS, params)}
    return [ids[(a.job_id, a.tier, a.sample)] for a in new]


_HELD_ATTEMPT = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error, reserved_usd)
SELECT id, :tier, :model, :variant, :sample, :n, 'in_flight', :reserved FROM jobs
WHERE id = :job_id AND status = 'running' AND claim_no = :claim_no
  AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.cancelled_at IS NOT NULL)
FOR NO KEY UPDATE
RETURNING id
""")


def start_held_attempt(conn: Connection, held: Claim, model: str, variant: str | None, sample: int,
                       n: int, reserved_usd: Decimal | None = None) -> int | None:
    """Insert the row of one request about to go out, if ``held`` is still this worker's claim; None when the
    job was taken over (the worker froze or lost Postgres for longer than the dead-after bound) or its batch was
    cancelled: its request must not go out. The row lock orders this against a takeover, whose claim then marks the row interrupted; it
    is the lock the attempts triggers take anyway (migration 0004), so concurrent requests of one job queue
    behind each other instead of deadlocking."""
    row = conn.execute(_HELD_ATTEMPT, {"job_id": held.job_id, "claim_no": held.claim_no, "tier": held.tier,
                                       "model": model, "variant": variant, "sample": sample, "n": n,
                                       "reserved": reserved_usd}).first()
    return None if row is None else int(row.id)


_LOCK_HELD = text("""
SELECT 1 FROM jobs WHERE id = :job_id AND status = 'running' AND claim_no = :claim_no FOR NO KEY UPDATE
""")


def lock_held_job(conn: Connection, held: Claim) -> bool:
    """Lock the job's row if ``held`` is still this worker's claim (False: it was taken over)."""
    return conn.execute(_LOCK_HELD, {"job_id": held.job_id, "claim_no": held.claim_no}).first() is not None


_LOCK_JOBS = text("SELECT id FROM jobs WHERE id = ANY(:ids) ORDER BY id FOR NO KEY UPDATE")
_INTERRUPTED = text("SELECT id FROM attempts WHERE id = ANY(:ids) AND error = 'interrupted'")


def lock_for_settling(conn: Connection, job_ids: Sequence[int], attempt_ids: Sequence[int]) -> set[int]:
    """Lock the jobs' rows (in id order) and return which of ``attempt_ids`` were marked interrupted: with the
    jobs locked no claim can mark more of them before this transaction ends."""
    conn.execute(_LOCK_JOBS, {"ids": sorted(set(job_ids))})
    return {int(i) for (i,) in conn.execute(_INTERRUPTED, {"ids": list(attempt_ids)})}


# A row marked interrupted meanwhile belongs to a claim that was taken over (its worker froze past the
# dead-after bound, then resumed): its tokens and cost are recorded (the provider billed them) but its
# error stays, so it never counts as an answer beside the new claim's.
_END_ATTEMPTS_SQL = """
UPDATE attempts a SET latency_ms = e.latency_ms, input_tokens = e.input_tokens, output_tokens = e.output_tokens,
                      cost_usd = e.cost_usd,
                      error = CASE WHEN a.error = 'in_flight' THEN e.error ELSE a.error END,
                      detail = CASE WHEN a.error = 'in_flight' THEN e.detail
                                    ELSE 'came back after the job was taken over: ' || coalesce(e.error, 'answer') END,
                      response = CAST(e.response AS jsonb), truncated = CAST(e.truncated AS jsonb),
                      cached_tokens = coalesce(e.cached_tokens, 0), reasoning_tokens = coalesce(e.reasoning_tokens, 0),
                      choices = e.choices, refusals = CAST(e.refusals AS jsonb), request_id = e.request_id,
                      served_model = e.served_model, gateway_cost_usd = e.gateway_cost_usd,
                      cached = coalesce(e.cached, false), saved_usd = e.saved_usd, cost_estimated = false
FROM unnest(CAST(:ids AS bigint[]), CAST(:latency_ms AS int[]), CAST(:input_tokens AS int[]),
            CAST(:output_tokens AS int[]), CAST(:cost_usd AS numeric[]), CAST(:error AS text[]),
            CAST(:detail AS text[]), CAST(:response AS text[]), CAST(:truncated AS text[]),
            CAST(:cached_tokens AS int[]), CAST(:reasoning_tokens AS int[]), CAST(:choices AS int[]),
            CAST(:refusals AS text[]), CAST(:request_id AS text[]), CAST(:served_model AS text[]),
            CAST(:gateway_cost_usd AS numeric[]), CAST(:cached AS boolean[]), CAST(:saved_usd AS numeric[]))
     AS e(id, latency_ms, input_tokens, output_tokens, cost_usd, error, detail, response, truncated, cached_tokens,
          reasoning_tokens, choices, refusals, request_id, served_model, gateway_cost_usd, cached, saved_usd)
WHERE a.id = e.id AND a.error IN ('in_flight', 'interrupted')
RETURNING a.id, a.job_id, a.error = 'interrupted' AS late
"""
_END_ATTEMPTS = text(_END_ATTEMPTS_SQL)
# The same, storing answers in the request cache on the way (one round trip for both).
_END_AND_FILL = text(f"WITH fill AS ({FILL_SQL}) {_END_ATTEMPTS_SQL}")
_END_FIELDS = ("latency_ms", "input_tokens", "output_tokens", "cost_usd", "error", "detail", "response", "truncated",
               "cached_tokens", "reasoning_tokens", "choices", "refusals", "request_id", "served_model",
               "gateway_cost_usd", "cached", "saved_usd")
# A late answer's cost joins its job's total at once (a job that already finished is not moved again); audit work
# (``attempts.audit``) is never part of it.
_RECOST = text("""
UPDATE jobs SET cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = jobs.id AND NOT audit)
WHERE id = ANY(:ids)
""")


def end_attempts(conn: Connection, rows: list[dict[str, Any]],  # Any: bound parameters
                 fills: Sequence[Fill] = ()) -> set[int]:
    """Record the outcome of requests (keys: id, latency_ms, input/output_tokens, cost_usd, error, detail,
    response, truncated and refusals as JSON text or None; and what the provider told: cached_tokens,
    reasoning_tokens, choices, request_id, served_model, gateway_cost_usd; and for an answer read from the
    request cache, cached and saved_usd; any but the first eight may be left out) in one statement. A request
    whose claim was taken over meanwhile stays ``interrupted``, with its cost added to its job. ``fills``:
    answers to store in the request cache in the same statement (``store.cache.fill_keys``). Returns the ids
    of the late ones (interrupted meanwhile: their estimated cost replaced by the real one)."""
    if not rows:
        fill_keys(conn, fills)
        return set()
    else:
        params: dict[str, Any] = {"ids": [r["id"] for r in rows]}  # Any: column values
        params.update({name: [r.get(name) for r in rows] for name in _END_FIELDS})
        if fills:
            params["fills"] = fill_param(fills)
        late = {(attempt_id, job_id) for attempt_id, job_id, is_late
                in conn.execute(_END_AND_FILL if fills else _END_ATTEMPTS, params) if is_late}
        if late:
            conn.execute(_RECOST, {"ids": sorted({job_id for _, job_id in late})})
        return {attempt_id for attempt_id, _ in late}


_ANSWERS = text("""
SELECT job_id, sample, response, truncated, refusals, model FROM attempts
WHERE job_id = ANY(:ids) AND tier = :tier AND error IS NULL AND NOT superseded
""")


@dataclass
class Answers:
    """A job's counted answers at one tier: sample index → content, the samples cut off at max_tokens, and
    the samples the model refused or its provider filtered (sample → (code, detail)): never votes."""

    contents: dict[int, str | None]
    truncated: set[int]
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: answered samples per model that answered them (a tier's fallback answers some after a fault)
    models: dict[str, int] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        """The model that answered most of the samples (None: none answered)."""
        return max(self.models, key=lambda m: self.models[m]) if self.models else None


def answers_many(conn: Connection, job_ids: Sequence[int], tier: int) -> dict[int, Answers]:
    """Per job: the answers of the requests that count."""
    out = {i: Answers({}, set()) for i in job_ids}
    for job_id, sample, response, truncated, refusals, model in conn.execute(_ANSWERS, {"ids": list(job_ids),
                                                                                         "tier": tier}):
        got = out[job_id]
        got.models[model] = got.models.get(model, 0) + len(response or [])
        for i, content in enumerate(response or []):
            got.contents[sample + i] = content
        out[job_id].truncated.update(truncated or [])
        for index, why in (refusals or {}).items():
            out[job_id].refused[int(index)] = (why["code"], why.get("detail", ""))
    return out


_VALIDATION = text("""
INSERT INTO validations (job_id, tier, model, passed, reasons, agreement, votes, samples, answer_key)
VALUES (:job_id, :tier, :model, :passed, CAST(:reasons AS jsonb), :agreement, :votes, :samples, :answer_key)
ON CONFLICT (job_id, tier) WHERE NOT superseded DO NOTHING
""")


def record_validations(conn: Connection, rows: list[dict[str, Any]]) -> None:  # Any: bound parameters
    """Insert verdicts (one per job and tier: a repeated one is ignored); pipelined in one round trip."""
    if rows:
        conn.execute(_VALIDATION, rows)

