"""Prometheus metrics read at scrape time from the ledger in Postgres and from the broker (``cascade metrics``).

Every scrape reads Postgres in one read-only REPEATABLE READ transaction, so its figures agree with each
other, and never reads a ledger table whole (``cascade.store.metrics``): jobs come from the summary kept by
triggers, and the request, verdict and audit ledgers from tallies. A ``Tally`` keeps, in this process, the sums
of the rows up to a watermark id that can no longer change; each scrape reads only the rows past it and the
few below it that were still open (a request in flight, an audit queued). The watermark moves to a ``Mark``
(the largest ids seen, and the transactions writing a ledger table just then) once every one of those
transactions has ended, so no row that commits late is ever missed; marks are taken at each scrape and every
``MARK_EVERY_S`` between, so a scrape reads the rows of the last few seconds. The process reads each ledger
whole once, when it starts (``CascadeCollector.warm_up``).

Counters never go down while the process runs: a figure that drops (an estimated cost replaced by the lower
real one, a deleted batch) keeps its last value until the ledger passes it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from cascade.errors import CascadeError, ServiceUnreachable
from cascade.store import metrics as store

__all__ = ["MARK_EVERY_S", "CascadeCollector", "Figures", "Mark", "Tally", "add_sums", "families", "fold_target"]

log = logging.getLogger(__name__)

#: Between scrapes a mark is taken this often (while scrapes come), so that a scrape reads only the rows of
#: the last few seconds, whatever the scrape interval.
MARK_EVERY_S = 1.0
#: How long a scrape waits for the broker's queue lengths (kombu retries a refused connection for seconds).
BROKER_WAIT_S = 3.0
#: No marks are taken when no scrape came for this long.
IDLE_S = 300.0
#: Marks kept while a long write holds the watermark back (the oldest are dropped first).
MAX_MARKS = 1000

Sums = dict[store.Key, store.Sums]
#: Postgres's SQLSTATE for a statement cancelled (here: by statement_timeout)
_QUERY_CANCELED = "57014"


def add_sums(a: Sums, b: Sums) -> Sums:
    """``a`` + ``b``, key by key (a new dict; the inputs are left as they are)."""
    out = dict(a)
    for key, values in b.items():
        have = out.get(key)
        out[key] = values if have is None else tuple(x + y for x, y in zip(have, values, strict=True))
    return out


@dataclass(frozen=True)
class Mark:
    """What a read saw: when (``time.monotonic``), each ledger's largest id, and the transactions that held a
    write lock on a ledger table just after (one of them holds any row with a smaller id not visible yet)."""

    at: float
    max_ids: dict[str, int]
    writers: frozenset[str]


def fold_target(marks: Sequence[Mark], running: frozenset[str]) -> Mark | None:
    """The newest of ``marks`` none of whose writers is among the transactions ``running`` (checked before the
    snapshot that is to fold): every row with an id up to its ``max_ids`` that will ever be written is then
    visible. None when there is none."""
    clear = [m for m in marks if not m.writers & running]
    return clear[-1] if clear else None


@dataclass(frozen=True)
class Tally:
    """A ledger's sums in this process: ``base`` sums the final rows with ids up to ``upto`` except ``pending``,
    those of them that were still open when ``upto`` passed them."""

    ledger: store.Ledger
    upto: int = 0
    base: Sums = field(default_factory=dict)
    pending: tuple[int, ...] = ()

    def read(self, conn: Connection, upto: int) -> tuple[Sums, Tally]:
        """The ledger's sums in ``conn``'s snapshot, and the tally to keep once the scrape has succeeded (with
        the watermark moved to ``upto``, if that is further)."""
        upto = max(upto, self.upto)
        got = store.read_tally(conn, self.ledger, after=self.upto, upto=upto, pending=self.pending)
        base = add_sums(self.base, got.settled)
        return add_sums(base, got.unsettled), Tally(self.ledger, upto, base, tuple(got.open_ids))


@dataclass(frozen=True)
class Figures:
    """Everything one scrape read. Ledger sums are keyed as ``cascade.store.metrics`` groups them."""

    jobs: dict[str, store.JobCounts]
    tiers: dict[str, int]
    attempts: Sums
    validations: Sums
    audits: Sums
    batch_budgets: list[store.BatchBudget] = field(default_factory=list)
    daily_budgets: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    daily_caps: dict[str, Decimal] = field(default_factory=dict)
    #: messages waiting per queue; None when the broker did not answer (or none is configured)
    queues: dict[str, int] | None = None
    read_s: float = 0.0


def _counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _job_families(f: Figures) -> Iterator[Metric]:
    jobs = _gauge("cascade_jobs", "Jobs now in each status, per task type.", ["task_type", "status"])
    submitted = _counter("cascade_jobs_submitted_total", "Jobs submitted, per task type (a job run again by "
                         "cascade retry counts once).", ["task_type"])
    cost = _counter("cascade_cost_usd_total", "What the jobs' requests cost in USD, per task type (the jobs' "
                    "cost_usd; audit work is in cascade_audit_cost_usd_total).", ["task_type"])
    for task_type, counts in sorted(f.jobs.items()):
        for status, n in sorted(counts.by_status.items()):
            jobs.add_metric([task_type, status], n)
        submitted.add_metric([task_type], sum(counts.by_status.values()))
        cost.add_metric([task_type], float(counts.cost_usd))
    yield from (jobs, submitted, cost)


def _verdict_families(f: Figures) -> Iterator[Metric]:
    verdicts = _counter("cascade_verdicts_total", "Verdicts on a tier's answers (passed: accepted), per task type "
                        "and tier.", ["task_type", "tier", "verdict"])
    escalations = _counter("cascade_escalations_total", "Jobs escalated into this tier: a verdict at the tier below "
                           "rejected the answer and the job moved up (so it started below this tier).",
                           ["task_type", "tier"])
    into: dict[tuple[str, int], int] = {(t, tier): 0 for t, n in f.tiers.items() for tier in range(2, n + 1)}
    by_verdict: dict[tuple[str, str, str], int] = {}
    for (task_type, tier, passed, escalated), (n,) in f.validations.items():
        key = (task_type, str(tier), "passed" if passed else "rejected")
        by_verdict[key] = by_verdict.get(key, 0) + n
        if escalated:
            into[(task_type, tier + 1)] = into.get((task_type, tier + 1), 0) + n
    for labels, n in sorted(by_verdict.items()):
        verdicts.add_metric(list(labels), n)
    for (task_type, tier), n in sorted(into.items()):
        escalations.add_metric([task_type, str(tier)], n)
    yield from (verdicts, escalations)


def _request_families(f: Figures) -> Iterator[Metric]:
    requests = _counter("cascade_model_requests_total", "Requests sent to each model that ended, by error kind "
                        "(none: an answer). Answers from the request cache are not requests.", ["model", "error"])
    in_flight = _gauge("cascade_model_requests_in_flight", "Requests to each model sent and not ended yet.",
                       ["model"])
    cost = _counter("cascade_model_cost_usd_total", "What the requests to each model cost in USD, audits included "
                    "(an interrupted request counts at its cost bound until its answer comes back).", ["model"])
    tokens = _counter("cascade_model_tokens_total", "Tokens of the requests sent to each model.",
                      ["model", "direction"])
    by: dict[str, dict[str, float]] = {}
    for (_, model, error, cached), (n, usd, _saved, tokens_in, tokens_out) in f.attempts.items():
        sums = by.setdefault(model, {"cost": 0.0, "in_flight": 0, "input": 0, "output": 0})
        sums["cost"] += float(usd)
        if error == "in_flight":
            sums["in_flight"] += n
        elif not cached:
            kind = f"error:{error or 'none'}"
            sums[kind] = sums.get(kind, 0) + n
            sums["input"] += tokens_in
            sums["output"] += tokens_out
    for model, sums in sorted(by.items()):
        cost.add_metric([model], sums["cost"])
        in_flight.add_metric([model], sums["in_flight"])
        for direction in ("input", "output"):
            tokens.add_metric([model, direction], sums[direction])
        for kind, n in sorted(sums.items()):
            if kind.startswith("error:"):
                requests.add_metric([model, kind[6:]], n)
    yield from (requests, in_flight, cost, tokens)


def _cache_families(f: Figures) -> Iterator[Metric]:
    hits = _counter("cascade_cache_hits_total", "Requests answered from the request cache, per task type.",
                    ["task_type"])
    misses = _counter("cascade_cache_misses_total", "Answered requests that went to a model, per task type.",
                      ["task_type"])
    saved = _counter("cascade_cache_saved_usd_total", "What the cache hits' answers cost when they were paid "
                     "for, in USD, per task type.", ["task_type"])
    by: dict[str, list[float]] = {t: [0, 0, 0.0] for t in f.jobs}
    for (task_type, _, error, cached), (n, _, usd_saved, _, _) in f.attempts.items():
        sums = by.setdefault(task_type, [0, 0, 0.0])
        if cached:
            sums[0] += n
            sums[2] += float(usd_saved)
        elif error == "":
            sums[1] += n
    for task_type, (h, m, s) in sorted(by.items()):
        hits.add_metric([task_type], h)
        misses.add_metric([task_type], m)
        saved.add_metric([task_type], s)
    yield from (hits, misses, saved)


def _audit_families(f: Figures) -> Iterator[Metric]:
    audits = _gauge("cascade_audits", "Quality audits in each status, per task type.", ["task_type", "status"])
    audited = _counter("cascade_audited_total", "Audits with a verdict (the auditor gave a valid answer), per task "
                       "type and the tier and model whose accepted answer was audited.", ["task_type", "tier", "model"])
    agreed = _counter("cascade_audit_agreed_total", "Audits whose auditor agreed with the accepted answer.",
                      ["task_type", "tier", "model"])
    cost = _counter("cascade_audit_cost_usd_total", "What the audits' requests cost in USD, per task type.",
                    ["task_type"])
    statuses: dict[tuple[str, str], int] = {}
    verdicts: dict[tuple[str, str, str], list[int]] = {}
    costs: dict[str, float] = {}
    for (task_type, tier, model, status, agrees), (n, usd) in f.audits.items():
        for s in ("queued", "running", "done", "skipped"):
            statuses.setdefault((task_type, s), 0)
        statuses[(task_type, status)] = statuses.get((task_type, status), 0) + n
        costs[task_type] = costs.get(task_type, 0.0) + float(usd)
        if agrees is not None:
            sums = verdicts.setdefault((task_type, str(tier), model), [0, 0])
            sums[0] += n
            sums[1] += n if agrees else 0
    for labels, n in sorted(statuses.items()):
        audits.add_metric(list(labels), n)
    for key, (a, g) in sorted(verdicts.items()):
        audited.add_metric(list(key), a)
        agreed.add_metric(list(key), g)
    for task_type, usd in sorted(costs.items()):
        cost.add_metric([task_type], usd)
    yield from (audits, audited, agreed, cost)


def _budget_families(f: Figures) -> Iterator[Metric]:
    labels = ["batch", "task_type"]
    cap = _gauge("cascade_batch_budget_cap_usd", "A running batch's cap on spend (--max-cost), in USD.", labels)
    spent = _gauge("cascade_batch_budget_spent_usd", "What a running capped batch's ended requests cost, in USD.",
                   labels)
    reserved = _gauge("cascade_batch_budget_reserved_usd", "Cost bounds reserved by a running capped batch's "
                      "requests in flight, in USD.", labels)
    for b in f.batch_budgets:
        cap.add_metric([b.batch_id, b.task_type], float(b.cap_usd))
        spent.add_metric([b.batch_id, b.task_type], float(b.spent_usd))
        reserved.add_metric([b.batch_id, b.task_type], float(b.reserved_usd))
    yield from (cap, spent, reserved)
    day_spent = _gauge("cascade_task_budget_spent_usd", "A task type's spend in the window its daily budget sums "
                       "(the last 24 hours and the hour they start in), in USD.", ["task_type"])
    day_reserved = _gauge("cascade_task_budget_reserved_usd", "Cost bounds reserved in that window by requests in "
                          "flight, in USD.", ["task_type"])
    for task_type, (s, r) in sorted(f.daily_budgets.items()):
        day_spent.add_metric([task_type], float(s))
        day_reserved.add_metric([task_type], float(r))
    day_cap = _gauge("cascade_task_budget_per_day_usd", "A task type's daily budget (budget.per_day_usd in the "
                     "config this process loaded), in USD.", ["task_type"])
    for task_type, usd in sorted(f.daily_caps.items()):
        day_cap.add_metric([task_type], float(usd))
    yield from (day_spent, day_reserved, day_cap)


def _service_families(f: Figures) -> Iterator[Metric]:
    queues = _gauge("cascade_queue_messages", "Messages waiting on each broker queue (a message holds up to "
                    "CASCADE_JOBS_PER_MESSAGE job ids).", ["queue"])
    for queue, n in sorted((f.queues or {}).items()):
        queues.add_metric([queue], n)
    broker = _gauge("cascade_broker_up", "1 when the broker answered this scrape's queue lengths, else 0.")
    broker.add_metric([], 1 if f.queues is not None else 0)
    took = _gauge("cascade_scrape_duration_seconds", "How long this scrape took to read Postgres and the broker.")
    took.add_metric([], f.read_s)
    yield from (queues, broker, took)


def families(f: Figures) -> list[Metric]:
    """The metric families of one scrape's figures."""
    parts: tuple[Callable[[Figures], Iterator[Metric]], ...] = (
        _job_families, _verdict_families, _request_families, _cache_families, _audit_families, _budget_families, _service_families)
    return [family for part in parts for family in part(f)]


def _in_thread(fn: Callable[[], dict[str, int]]) -> Future[dict[str, int]]:
    """``fn()`` in a daemon thread (one stuck on an unreachable broker never delays the process's exit)."""
    future: Future[dict[str, int]] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=run, name="cascade-metrics-broker", daemon=True).start()
    return future


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class CascadeCollector(Collector):
    """A Prometheus collector that reads the figures at each scrape (``collect``), one scrape at a time.

    ``collect`` raises ``ServiceUnreachable`` when Postgres does not answer, ``CascadeError`` when it fails a
    statement (a schema that is not migrated, the statement timeout): the scrape has no figures, and the next
    one starts afresh. A broker that does not answer within ``BROKER_WAIT_S`` only leaves the queue lengths out
    (``cascade_broker_up`` 0).
    """

    def __init__(self, engine: Engine, *, queue_lengths: Callable[[], dict[str, int]] | None = None,
                 daily_caps: dict[str, Decimal] | None = None, timeout_s: float = 10.0, database_host: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.queue_lengths = queue_lengths
        self.daily_caps = daily_caps or {}
        self.timeout_s = timeout_s
        self.database_host = database_host
        self.clock = clock
        self._lock = threading.Lock()
        self._tallies = {ledger.name: Tally(ledger) for ledger in store.LEDGERS}
        self._marks: list[Mark] = []
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._broker_failing = False
        self._broker_call: Future[dict[str, int]] | None = None
        self._last_scrape: float | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # nothing is read when the collector is registered

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return self._monotone(families(self._read()))

    def read(self) -> Figures:
        """One scrape's figures (ServiceUnreachable or CascadeError when Postgres fails, as ``collect``)."""
        with self._lock:
            return self._read()

    def _read(self) -> Figures:
        started = self._last_scrape = self.clock()
        with self._database(), self.engine.connect() as conn:
            # Which marks' writers are still running, asked before the snapshot that folds: one that ends later
            # may commit rows this snapshot cannot see.
            writers = sorted(set().union(*(m.writers for m in self._marks)))
            target = fold_target(self._marks, store.still_running(conn, writers))
            conn.commit()
            with self._snapshot(conn):
                ids = store.max_ids(conn)
                sums: dict[str, Sums] = {}
                tallies: dict[str, Tally] = {}
                for name, tally in self._tallies.items():
                    sums[name], tallies[name] = tally.read(conn, target.max_ids[name] if target else tally.upto)
                figures = Figures(store.job_counts(conn), store.task_tiers(conn), sums["attempts"],
                                  sums["validations"], sums["audits"], store.batch_budgets(conn),
                                  store.daily_budgets(conn), self.daily_caps)
                mark = Mark(started, ids, store.ledger_writers(conn))
        # The scrape succeeded: keep what it folded, and its mark for the scrapes to come.
        self._tallies = tallies
        self._keep_mark(mark, target)
        return replace(figures, queues=self._queues(), read_s=self.clock() - started)

    def warm_up(self, wait_s: float = 10.0) -> None:
        """Read each ledger whole once, now, so that later scrapes read only what is new: take a mark, wait until
        its writers have ended (up to ``wait_s``), and read. Raises as ``read``."""
        with self._lock:
            self._keep_mark(self._mark(), None)
            deadline = self.clock() + wait_s
            while self._running(self._marks[-1].writers) and self.clock() < deadline:
                time.sleep(0.05)
            self._read()

    def mark(self) -> None:
        """Take a mark now, if a scrape came in the last ``IDLE_S`` seconds (``start_marking`` calls it every
        ``MARK_EVERY_S``). A database error is logged at debug level: the next scrape reports it."""
        with self._lock:
            if self._last_scrape is None or self.clock() - self._last_scrape > IDLE_S:
                return
            try:
                self._keep_mark(self._mark(), None)
            except CascadeError as exc:
                log.debug("no mark: %s", exc)

    def start_marking(self, every_s: float = MARK_EVERY_S) -> threading.Event:
        """Call ``mark`` every ``every_s`` seconds in a daemon thread, until the returned event is set."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every_s):
                self.mark()

        threading.Thread(target=run, name="cascade-metrics-marks", daemon=True).start()
        return stop

    def _keep_mark(self, mark: Mark, folded: Mark | None) -> None:
        marks = [m for m in self._marks if folded is None or m.at > folded.at]
        self._marks = [*marks[-MAX_MARKS + 1:], mark]

    def _mark(self) -> Mark:
        at = self.clock()
        with self._database(), self.engine.connect() as conn:
            ids = store.max_ids(conn)
            writers = store.ledger_writers(conn)  # after max_ids (its docstring says why)
            conn.rollback()
        return Mark(at, ids, writers)

    def _running(self, writers: frozenset[str]) -> frozenset[str]:
        with self._database(), self.engine.connect() as conn:
            return store.still_running(conn, sorted(writers))

    @contextmanager
    def _snapshot(self, conn: Connection) -> Iterator[None]:
        """``conn`` in a read-only REPEATABLE READ transaction: one snapshot for the whole scrape."""
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            store.scrape_snapshot(conn, self.timeout_s)
            yield

    @contextmanager
    def _database(self) -> Iterator[None]:
        """SQLAlchemy's errors as cascade's: ServiceUnreachable naming the host, or CascadeError."""
        where = f" at {self.database_host}" if self.database_host else ""
        try:
            yield
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == _QUERY_CANCELED:
                raise CascadeError(f"the database{where} did not answer a metrics query within {self.timeout_s:g} s "
                                   "(--timeout)") from exc
            if isinstance(exc, OperationalError | InterfaceError):
                raise ServiceUnreachable("database", host=self.database_host,
                                         detail=_first_line(exc.orig or exc)) from exc
            raise CascadeError(f"the database{where} failed a metrics query: {_first_line(exc.orig or exc)}"
                               " (is it migrated? `cascade db upgrade`)") from exc

    def _queues(self) -> dict[str, int] | None:
        """The queue lengths, or None when the broker did not answer within ``BROKER_WAIT_S`` (a call still
        waiting from an earlier scrape is not doubled: the broker counts as down until it returns)."""
        if self.queue_lengths is None:
            return None
        if self._broker_call is None or self._broker_call.done():
            self._broker_call = _in_thread(self.queue_lengths)
        try:
            lengths = self._broker_call.result(timeout=BROKER_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - any broker failure or wait: reported as down, the figures stand
            if not self._broker_failing:
                log.warning("the broker did not answer its queue lengths: %s", _first_line(exc))
            self._broker_failing = True
            return None
        self._broker_failing = False
        return lengths

    def _monotone(self, metrics: list[Metric]) -> list[Metric]:
        """Counters never go down while this process runs: a sample lower than the last one shown keeps that."""
        for metric in metrics:
            if metric.type != "counter":
                continue
            samples = []
            for sample in metric.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = max(sample.value, self._last.get(key, sample.value))
                self._last[key] = value
                samples.append(sample._replace(value=value))
            metric.samples = samples
        return metrics
