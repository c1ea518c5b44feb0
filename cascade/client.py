"""The public Python API: ``Client.submit / status / wait / results / stats / sweep``.

    client = cascade.Client()                       # CASCADE_DATABASE_URL, CASCADE_BROKER_URL, CASCADE_CONFIG
    batch = client.submit("invoice_fields", rows)   # rows: an iterable of dicts, or a path
    client.wait(batch, timeout=600)
    for row in client.results(batch): ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine

from cascade import producer, store
from cascade.config import CascadeConfig, CascadeSettings, TaskSnapshot, load_config, load_settings
from cascade.errors import ConfigError, InputError
from cascade.health import RedisHealth
from cascade.publish import CeleryPublisher, Publisher

__all__ = ["BatchStatus", "Client"]


@dataclass(frozen=True)
class BatchStatus:
    """Where a batch's jobs are."""

    batch_id: str
    task_type: str
    rows: int
    counts: dict[str, int]  # by status
    by_tier: dict[int, int] = field(default_factory=dict)  # unfinished and finished jobs by current tier
    cost_usd: Decimal = Decimal(0)
    #: why the batch stopped (a request no retry or bigger model can fix: bad key, unknown model), or None
    halted: str | None = None
    #: what a user should know about how the batch runs (a model that ignores n)
    notes: list[str] = field(default_factory=list)
    #: (hits, misses, saved_usd) of the request cache for the batch's answered requests; None when not read
    cache: tuple[int, int, Decimal] | None = None
    #: (cap, spent, reserved) of a batch submitted with a cap (``max_cost``); None without one
    budget: tuple[Decimal, Decimal, Decimal] | None = None
    #: (start tier, what chose it, jobs) when some job did not start at tier 1 by default; None when not read
    starts: list[tuple[int, str, int]] | None = None
    #: (waiting or running, agreed, disagreed, cost) of the batch's quality audits; None when not read or none
    audits: tuple[int, int, int, Decimal] | None = None
    #: the batch was cancelled (``cancel``): its jobs end as cancelled, none goes on
    cancelled: bool = False
    #: (per day, spent, reserved) of its task type's daily budget over the last 24 hours; None without one
    daily: tuple[Decimal, Decimal, Decimal] | None = None

    @property
    def finished(self) -> int:
        """Jobs that will not change any more: succeeded, failed or cancelled."""
        return self.counts.get("succeeded", 0) + self.counts.get("failed", 0) + self.counts.get("cancelled", 0)

    @property
    def is_done(self) -> bool:
        return self.finished >= self.rows

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"batch_id": self.batch_id, "task_type": self.task_type, "rows": self.rows,
                "finished": self.finished, "counts": self.counts, "cancelled": self.cancelled,
                "by_tier": {str(k): v for k, v in self.by_tier.items()}, "cost_usd": str(self.cost_usd),
                "halted": self.halted, "notes": self.notes,
                "cache": None if self.cache is None else {"hits": self.cache[0], "misses": self.cache[1],
                                                          "saved_usd": str(self.cache[2])},
                "budget": None if self.budget is None else {
                    "cap_usd": str(self.budget[0]), "spent_usd": str(self.budget[1]),
                    "reserved_usd": str(self.budget[2]), "left_usd": str(self.budget[0] - sum(self.budget[1:]))},
                "starts": None if self.starts is None else [
                    {"start_tier": tier, "route": route, "jobs": n} for tier, route, n in self.starts],
                "daily_budget": None if self.daily is None else {
                    "per_day_usd": str(self.daily[0]), "spent_usd": str(self.daily[1]),
                    "reserved_usd": str(self.daily[2]), "left_usd": str(self.daily[0] - sum(self.daily[1:]))},
                "audits": None if self.audits is None else {
                    "waiting": self.audits[0], "agreed": self.audits[1], "disagreed": self.audits[2],
                    "cost_usd": str(self.audits[3])}}


def parse_cap(value: Decimal | float | str | None, flag: str = "max_cost") -> Decimal | None:
    """A budget cap in USD: None, or a finite number above 0 (InputError naming ``flag`` otherwise)."""
    if value is None:
        return None
    try:
        cap = Decimal(str(value))
    except ArithmeticError:
        raise InputError(f"{flag} must be a number of USD, not {value!r}") from None
    if not cap.is_finite() or cap <= 0:
        raise InputError(f"{flag} must be above 0 USD, not {value!r}")
    return cap


class Client:
    """Submit batches and read their state. Engines and publishers are built from settings unless given."""

    def __init__(
        self,
        settings: CascadeSettings | None = None,
        *,
        engine: Engine | None = None,
        publisher: Publisher | None = None,
        config: CascadeConfig | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self._engine = engine
        self._publisher = publisher
        self._config = config

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if not self.settings.database_url:
                raise ConfigError("CASCADE_DATABASE_URL is not set (run `cascade dev` for an embedded stack)")
            self._engine = store.make_engine(self.settings.database_url, schema=self.settings.db_schema,
                                             pooler=self.settings.database_pooler)
        return self._engine

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            if not self.settings.broker_url:
                raise ConfigError("CASCADE_BROKER_URL is not set (run `cascade dev` for an embedded stack)")
            self._publisher = CeleryPublisher.connect(self.settings, self.settings.broker_url)
        return self._publisher

    @property
    def config(self) -> CascadeConfig:
        if self._config is None:
            self._config = load_config(self.settings.config)
        return self._config

    def submit(
        self,
        task_type: str,
        rows: Iterable[dict[str, Any]] | str | Path,  # Any: user rows
        *,
        fmt: Literal["jsonl", "csv"] | None = None,
        key_field: str | None = None,
        idempotency_key: str | None = None,
        rejects_path: Path | None = None,
        on_committed: Callable[[str], None] | None = None,
        cache: bool = True,
        max_cost: Decimal | float | str | None = None,
    ) -> producer.SubmitResult:
        """Submit rows (dicts, or a JSONL/CSV file path) as one batch; see ``producer.submit_rows``. With
        ``cache=False`` every request of the batch goes to its model (answers are still written to the cache).
        ``max_cost``: a cap in USD on the batch's spend (InputError unless it is a number above 0): no request
        goes out unless its cost's upper bound fits in what is left; a job that cannot afford its next request
        ends failed as ``budget_exhausted``."""
        snap = self.config.snapshot(task_type, cache_reads=cache, max_cost_usd=parse_cap(max_cost))
        kw: dict[str, Any] = {"key_field": key_field, "idempotency_key": idempotency_key,  # Any: keyword args
                              "rejects_path": rejects_path, "on_committed": on_committed}
        if isinstance(rows, str | Path):
            path = Path(rows)
            kind = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
            try:
                stream = path.open("rb")
            except OSError as exc:
                raise InputError(f"cannot read: {exc.strerror}", source=str(path)) from None
            with stream:
                parsed = producer.read_rows(stream, kind, str(path))
                return producer.submit_rows(self.engine, self.publisher, snap, parsed, source=str(path), **kw)
        numbered = ((i, row) for i, row in enumerate(rows, start=1))
        return producer.submit_rows(self.engine, self.publisher, snap, numbered, **kw)

    def resolve(self, batch_id: str) -> str:
        """The whole id of the batch ``batch_id`` names: that id, or a unique prefix of one (git style).
        InputError if no batch matches, or several do (the message names some)."""
        with self.engine.connect() as conn:
            found = store.match_batch_ids(conn, batch_id) if batch_id else []
        if found and (found[0] == batch_id or len(found) == 1):
            return found[0]
        if not found:
            raise InputError(f"no batch {batch_id!r}")
        more = ", …" if len(found) > 5 else ""
        raise InputError(f"batch id prefix {batch_id!r} is ambiguous: {', '.join(found[:5])}{more} "
                         "(give more characters)")

    def status(self, batch_id: str, *, notes: bool = False) -> BatchStatus:
        """Counts of the batch's jobs by status and tier; ``batch_id`` may be a unique prefix. With ``notes``,
        also what a user should know about how it runs and its request cache hits (a read over the batch's
        requests: not for every poll).
        InputError if the batch does not exist."""
        batch_id = self.resolve(batch_id)
        with self.engine.connect() as conn:
            batch = store.batch_rows(conn, batch_id)
            if batch is None:
                raise InputError(f"no batch {batch_id!r}")
            rows = store.count_jobs(conn, batch_id)
            ignoring_n = store.models_ignoring_n(conn, batch_id) if notes else []
            cache = store.batch_cache_use(conn, batch_id) if notes else None
            snap = TaskSnapshot.model_validate(store.batch_config(conn, batch_id)) if notes else None
            cap = snap.max_cost_usd if snap is not None else None
            budget = (cap, *store.batch_budget(conn, batch_id)) if cap is not None else None
            starts = store.batch_starts(conn, batch_id) if notes else None
            audits = store.batch_audits(conn, batch_id) if snap is not None and snap.task_type.audit else None
            per_day = snap.task_type.budget if snap is not None else None
            daily = (per_day.per_day_usd, *store.daily_budget(conn, snap.task_type.name)) \
                if snap is not None and per_day is not None else None
        notes_ = [f"model {model!r} ignores n: its samples go out one request each (say supports_n: false in "
                  "cascade.yaml to skip the first try)" for model in ignoring_n]
        if snap is not None:
            notes_ += self._models_down(sorted(snap.models))
        counts: dict[str, int] = {}
        by_tier: dict[int, int] = {}
        for status, tier, n, _ in rows:
            counts[status] = counts.get(status, 0) + n
            by_tier[tier] = by_tier.get(tier, 0) + n
        cost = sum((r[3] or Decimal(0) for r in rows), Decimal(0))
        task_type, size, halted, cancelled = batch
        if starts is not None and all(route == "default" for _, route, _ in starts):
            starts = None  # every job started at tier 1: nothing to say
        return BatchStatus(batch_id, task_type, size, counts, dict(sorted(by_tier.items())), cost, halted, notes_,
                           cache, budget, starts, audits, cancelled, daily)

    def _models_down(self, names: list[str]) -> list[str]:
        """Notes on the models ``names`` that are down now (their circuit breakers, ``cascade.health``)."""
        url = self.settings.shared_redis_url
        if not url or not names:
            return []
        health = RedisHealth.from_broker(url, key_prefix=self.settings.key_prefix)
        try:
            states = health.peek(names)
        finally:
            health.close()
        return [f"model {name!r} is down ({s.fails} faults in a row, for {s.down_for_s:.0f} s): its tier uses its "
                f"fallbacks; next probe in {s.cooldown_left_s:.0f} s" for name, s in zip(names, states, strict=True)
                if not s.up]

    def jobs_by_stage(self, batch_id: str) -> list[tuple[int, str, str, int]]:
        """(tier, stage, status, count) of a batch's jobs: where each job is in the cascade right now."""
        batch_id = self.resolve(batch_id)
        with self.engine.connect() as conn:
            return store.count_jobs_by_stage(conn, batch_id)

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[BatchStatus], None] | None = None,
    ) -> BatchStatus:
        """Poll until every job is finished, the batch is halted (``halted`` says why: nothing more happens
        until ``resume``), or ``timeout`` seconds passed; returns the last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        batch_id = self.resolve(batch_id)
        while True:
            state = self.status(batch_id)
            if on_progress:
                on_progress(state)
            if state.is_done or state.halted or (deadline is not None and time.monotonic() >= deadline):
                return state
            time.sleep(poll_s)

    def batches(self, *, limit: int = 20, task_type: str | None = None) -> list[store.BatchSummary]:
        """The newest ``limit`` batches (of ``task_type`` if given), newest first, with their jobs counted."""
        with self.engine.connect() as conn:
            return store.list_batches(conn, limit=limit, task_type=task_type)

    def cancel(self, batch_id: str) -> store.Cancelled:
        """Cancel a batch (an id or unique prefix): its queued and deferred jobs are cancelled at once; a running
        job finishes the request it has in flight and stops there (no new request goes out), then is cancelled.
        ``wait`` returns once nothing runs; cancelled jobs count as not done (``cascade wait`` exits 1)."""
        batch_id = self.resolve(batch_id)
        with self.engine.begin() as conn:
            return store.cancel_batch(conn, batch_id)

    def retry_failed(self, batch_id: str, *, cancelled: bool = False,
                     max_cost: Decimal | float | str | None = None) -> tuple[int, Decimal | None]:
        """Run a batch's failed jobs (and its cancelled ones with ``cancelled``) again from tier 1, as new
        requests of the same jobs in the same batch (their earlier requests and verdicts are kept as history). The
        batch is no longer cancelled. ``max_cost``: what the retry may spend (the batch's cap becomes what it has
        spent plus this). Returns how many jobs were published and the batch's cap."""
        batch_id = self.resolve(batch_id)
        extra = parse_cap(max_cost)
        statuses = ["failed", "cancelled"] if cancelled else ["failed"]
        with self.engine.begin() as conn:
            ids, cap = store.retry_jobs(conn, batch_id, statuses, extra)
        for start in range(0, len(ids), 2000):
            self.publisher.publish([(job_id, 1, store.Stage.CALL) for job_id in ids[start: start + 2000]])
        return len(ids), cap

    def resume(self, batch_id: str) -> int:
        """Resume a halted batch (after fixing what halted it: the key on the workers, the model's config):
        its queued jobs are published again. Returns how many. InputError if the batch does not exist."""
        batch_id = self.resolve(batch_id)
        with self.engine.begin() as conn:
            due = store.resume_batch(conn, batch_id)
        if due is None:
            raise InputError(f"no batch {batch_id!r}")
        self.publisher.publish(due)
        return len(due)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:  # Any: JSON rows
        """One dict per input row, in input order: key, status, tier, output, cost_usd, error."""
        batch_id = self.resolve(batch_id)
        with self.engine.connect() as conn:
            for row in store.job_results(conn, batch_id):
                yield {"key": row.key, "status": row.status, "tier": row.tier, "output": row.output,
                       "cost_usd": str(row.cost_usd), "error": row.error}

    def stats(
        self,
        task_type: str | None = None,
        *,
        batch_ids: list[str] | None = None,
        since: datetime | None = None,
        include_eval: bool = True,
    ) -> list[dict[str, Any]]:  # Any: view rows
        """Rows of the ``escalation_stats`` view (one per task type), or the same columns over the jobs of
        ``batch_ids`` (unique prefixes allowed), of batches submitted since ``since``, and without
        ``cascade eval``'s batches unless ``include_eval``."""
        ids = None if batch_ids is None else [self.resolve(b) for b in batch_ids]
        with self.engine.connect() as conn:
            return store.escalation_stats_of(conn, task_type=task_type, batch_ids=ids, since=since,
                                             include_eval=include_eval)

    def routing_accuracy(self, task_type: str | None = None) -> list[dict[str, Any]]:  # Any: view rows
        """Rows of the ``routing_accuracy`` view: per task type, tier and model, the accepted answers, how many
        were audited and agreed with the auditor, with a 95 % interval, and how often an escalated job's rejected
        answer matched the one accepted above it."""
        with self.engine.connect() as conn:
            return store.routing_accuracy(conn, task_type)

    def eval_batches(self) -> int:
        """How many batches ``cascade eval`` submitted (``stats(include_eval=False)`` leaves them out)."""
        with self.engine.connect() as conn:
            return store.count_eval_batches(conn)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        close = getattr(self._publisher, "close", None)
        if close:
            close()
