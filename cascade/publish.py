"""Sends "job J is due at tier T, stage S" messages: the only module of the core that knows Celery.

Messages carry job ids (up to ``jobs_per_message`` per message, all due at one tier and stage), never
rows, and are routed by ``queue=`` only (CELERY-NOTES §5: after a Redis
FLUSHALL a publish through an exchange whose binding is gone is silently dropped; the anonymous
exchange used for plain queue routing is not).
"""

from __future__ import annotations

import base64
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cascade.config import CascadeConfig, CascadeSettings, is_redis_url, load_config
from cascade.errors import ConfigError
from cascade.store import Stage

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

__all__ = [
    "AUDIT_QUEUE",
    "AUDIT_TASK",
    "CALL_TASK",
    "SWEEP_QUEUE",
    "SWEEP_TASK",
    "VALIDATE_QUEUE",
    "VALIDATE_TASK",
    "CeleryPublisher",
    "Due",
    "Publisher",
    "TaskMessage",
    "all_queues",
    "broker_errors",
    "celery_config",
    "configured_tiers",
    "declare_tier_queues",
    "is_tier_queue",
    "make_queue",
    "messages",
    "queue_for",
    "tier_count",
    "tier_queues",
    "worker_queues",
]

CALL_TASK = "cascade.call_model"
VALIDATE_TASK = "cascade.validate"
VALIDATE_QUEUE = "validate"
AUDIT_TASK = "cascade.audit"
#: Quality audits (``cascade.stages.audit``): their own queue, which a deployment may give fewer workers than
#: the tiers; audits never hold up a batch (``cascade wait`` waits for jobs only).
AUDIT_QUEUE = "audit"
SWEEP_TASK = "cascade.sweep"
#: Celery beat's periodic sweep runs here, never behind a backlog on the tier queues (CELERY-NOTES §7).
SWEEP_QUEUE = "sweep"
#: Tier queues declared whatever the config says (a deployment's workers and Flower keep their queues when
#: a config has fewer tiers); a config with more tiers declares more (``tier_count``).
MIN_TIERS = 3
_TIER_QUEUE = re.compile(r"tier[1-9][0-9]*")
#: A publish of at least this many messages takes the bulk path on Redis (the producer's chunks, sweeps);
#: smaller ones (a stage's next steps) go through ``send_task`` with its signals and retry policy.
BULK_MIN = 8
_LPUSH_CHUNK = 1000

Due = tuple[int, int, Stage]  # (job id, tier, stage)
#: One task message: job ids due at one (tier, stage).
TaskMessage = tuple[list[int], int, Stage]


def messages(due: Sequence[Due], jobs_per_message: int) -> list[TaskMessage]:
    """Group dues into messages of at most ``jobs_per_message`` ids per (tier, stage), keeping their order."""
    open_: dict[tuple[int, Stage], list[int]] = {}
    out: list[TaskMessage] = []
    for job_id, tier, stage in due:
        ids = open_.get((tier, stage))
        if ids is None or len(ids) >= jobs_per_message:
            ids = open_[(tier, stage)] = []
            out.append((ids, tier, stage))
        ids.append(job_id)
    return out


def tier_count(config: CascadeConfig | None = None) -> int:
    """How many tier queues a config needs: its longest cascade, and never fewer than ``MIN_TIERS``."""
    longest = max((len(task.tiers) for task in config.task_types), default=0) if config else 0
    return max(MIN_TIERS, longest)


def configured_tiers(settings: CascadeSettings) -> int:
    """``tier_count`` of the config file ``settings.config``; ``MIN_TIERS`` when there is none.

    Workers need no config (a batch carries its own), so a missing or broken file is not fatal here: a broken
    one is logged and ``MIN_TIERS`` is used. A worker still consumes any ``-Q tierN`` it is given
    (workers/app.py declares it), and ``CeleryPublisher`` declares a tier queue the first time it publishes to it
    (``declare_tier_queues``).
    """
    if not settings.config.is_file():
        return tier_count()
    try:
        return tier_count(load_config(settings.config))
    except ConfigError as exc:
        log.warning("declaring %d tier queues: %s", MIN_TIERS, exc)
        return tier_count()


def tier_queues(count: int = MIN_TIERS) -> list[str]:
    """``tier1`` .. ``tier{count}``."""
    return [f"tier{i}" for i in range(1, count + 1)]


def is_tier_queue(name: str) -> bool:
    """Whether ``name`` is a tier's call queue (``tierN``, N ≥ 1)."""
    return _TIER_QUEUE.fullmatch(name) is not None


def worker_queues(tiers: int = MIN_TIERS) -> list[str]:
    """The queues a worker running every stage consumes: tier1..tier{tiers}, validate and audit."""
    return [*tier_queues(tiers), VALIDATE_QUEUE, AUDIT_QUEUE]


def all_queues(tiers: int = MIN_TIERS) -> list[str]:
    """Every queue cascade declares: tier1..tier{tiers}, validate, audit and sweep."""
    return [*worker_queues(tiers), SWEEP_QUEUE]


def broker_errors() -> tuple[type[Exception], ...]:
    """What a broker outage raises through kombu (its OperationalError) or, on RabbitMQ, through py-amqp (a
    dropped connection, a channel the broker closed), for loops that retry later."""
    from amqp.exceptions import AMQPError
    from kombu.exceptions import OperationalError

    return (OperationalError, AMQPError)


def queue_for(tier: int, stage: Stage) -> str:
    """Tier N's call stage runs on queue ``tierN``; every validation on ``validate``, every audit on ``audit``."""
    if stage is Stage.AUDIT:
        return AUDIT_QUEUE
    return f"tier{tier}" if stage is Stage.CALL else VALIDATE_QUEUE


def make_queue(name: str, arguments: dict[str, Any] | None = None) -> Any:  # Any: a kombu Queue
    """A durable queue bound only under its own name: to a direct exchange of the same name, with its name as
    routing key (messages go through the default exchange by queue name: CELERY-NOTES §5). Without an exchange
    of its own a queue would be bound to the default queue's exchange and key, so a publish there would be
    copied into every queue. ``arguments``: e.g. RabbitMQ's ``x-queue-type``."""
    from kombu import Exchange, Queue  # imported here: the rest of the core imports this module without Celery

    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True, queue_arguments=arguments)


def declare_tier_queues(app: Celery, names: Iterable[str]) -> None:
    """Declare in ``app`` each tier queue among ``names`` that it does not declare yet (with the arguments of
    the queues it has); other names are left alone (an undeclared one stays an error, as
    ``task_create_missing_queues`` is off)."""
    queues = app.amqp.queues
    missing = [name for name in names if is_tier_queue(name) and name not in queues]
    known = queues.get(VALIDATE_QUEUE)
    for name in missing:
        queues.add(make_queue(name, known.queue_arguments if known is not None else None))


_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
_QUORUM: dict[str, bool] = {}


def _quorum(settings: CascadeSettings, broker_url: str) -> bool:
    """Whether to declare quorum queues on this RabbitMQ: ``CASCADE_AMQP_QUEUE_TYPE``, or with ``auto`` whether
    the server is RabbitMQ 3.8 or later (asked once per process; a server that cannot be asked is assumed
    recent)."""
    if settings.amqp_queue_type != "auto":
        return settings.amqp_queue_type == "quorum"
    if broker_url not in _QUORUM:
        _QUORUM[broker_url] = _supports_quorum(broker_url)
    return _QUORUM[broker_url]


def _supports_quorum(broker_url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
            raw = conn.connection.server_properties.get("version", b"")
    except Exception as exc:  # noqa: BLE001 - any failure to ask: assume a recent server, say so
        log.warning("could not ask the broker for its version (%s); declaring quorum queues", exc)
        return True
    version = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (3, 8)


class Publisher(Protocol):
    def publish(self, due: Sequence[Due]) -> None:
        """Send messages for the due (job, tier, stage)s: every one of them in some message."""

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting per queue in the broker (the sweeper compares them with Postgres)."""


def celery_config(settings: CascadeSettings, broker_url: str,
                  tiers: int = MIN_TIERS) -> dict[str, Any]:  # Any: Celery's settings
    """The Celery settings every process (workers, producers, the sweeper) must share, declaring
    ``tiers`` tier queues (``configured_tiers`` gives the loaded config's count)."""
    if is_redis_url(broker_url):
        transport: dict[str, Any] = {  # Any: kombu transport options
            "visibility_timeout": settings.visibility_timeout_s,
            # gevent workers never run kombu's restore sweep (CELERY-NOTES §1); the Postgres sweeper
            # re-publishes instead, and a short restore cadence helps prefork/thread janitors.
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        }
        if settings.key_prefix:
            transport["global_keyprefix"] = settings.key_prefix
        arguments = None
    elif broker_url.split(":", 1)[0] in _AMQP_SCHEMES:  # RabbitMQ: a publish returns once the broker has the
        transport = {"confirm_publish": True}                # message (publisher confirms)
        arguments = {"x-queue-type": "quorum"} if _quorum(settings, broker_url) else None
    else:  # another kombu transport (memory:// in tests): its defaults
        transport, arguments = {}, None
    # Every queue is declared up front: Flower lists task_queues until it has inspected a worker. Missing
    # queues stay an error (a typo in -Q must not start a worker on a queue nobody publishes to); only tier
    # queues beyond these are added, by name (declare_tier_queues).
    queues = all_queues(tiers)
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # gevent's pool blocks the consumer in spawn() when every slot is busy, so at most concurrency + 1
        # messages are ever reserved (measured: -c 64 held 65 unacked) whatever this multiplier: each slot
        # holds one message, as prefetch 1 intends. With multiplier 1 the reservation limit is hit first, and
        # kombu then pauses BRPOP and sleeps a full second before fetching again (kombu redis
        # MultiChannelPoller.get): the pool ran at 8 of 64 slots on average and 15 jobs/s instead of 49.
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "task_queues": [make_queue(name, arguments) for name in queues],
        "task_default_queue": VALIDATE_QUEUE,
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 64,
    }


class CeleryPublisher:
    """Publishes through a Celery app (the worker's own, or a sending-only one for producers)."""

    def __init__(self, app: Celery, *, jobs_per_message: int = 1) -> None:
        self.app = app
        self.jobs_per_message = jobs_per_message
        self._templates: dict[tuple[str, str], _Envelope] = {}

    @classmethod
    def connect(cls, settings: CascadeSettings, broker_url: str, *, tiers: int | None = None) -> CeleryPublisher:
        """A sending-only app declaring ``tiers`` tier queues (default: ``configured_tiers(settings)``)."""
        from celery import Celery

        app = Celery("cascade-producer", set_as_current=False)
        app.conf.update(celery_config(settings, broker_url, configured_tiers(settings) if tiers is None else tiers))
        return cls(app, jobs_per_message=settings.jobs_per_message)


    def publish(self, due: Sequence[Due]) -> None:
        """Send the dues as task messages of up to ``jobs_per_message`` job ids (``messages``).

        On Redis, ``BULK_MIN`` or more messages are pushed with one LPUSH per queue and chunk instead of
        one ``send_task`` each (about 20× faster); they are the same Celery protocol-2 messages, routed by
        queue only, but ``before/after_task_publish`` signals are not sent for them. If the bulk push fails
        the chunk is sent again message by message (a message sent twice is a no-op for the stages).
        """
        batch = messages(due, self.jobs_per_message)
        if not batch:
            return
        # A job may escalate beyond the tiers this process declared (it has no config, or an older one).
        declare_tier_queues(self.app, {queue_for(tier, stage) for _, tier, stage in batch})
        with self.app.producer_or_acquire() as producer:
            if len(batch) >= BULK_MIN and _is_redis(producer):
                errors = producer.connection.connection_errors + producer.connection.channel_errors
                try:
                    self._push(producer, batch)
                    return
                except errors as exc:  # a broken connection: the slow path has Celery's retry policy
                    log.warning("bulk publish of %d messages failed (%r); sending them one by one", len(batch), exc)
            for ids, tier, stage in batch:
                self.app.send_task(_task(stage), args=[ids, tier], queue=queue_for(tier, stage), producer=producer)

    def _push(self, producer: Any, batch: Sequence[TaskMessage]) -> None:  # Any: a kombu Producer
        channel = producer.channel
        by_queue: dict[str, list[str]] = {}
        for ids, tier, stage in batch:
            queue = queue_for(tier, stage)
            key = (_task(stage), queue)
            template = self._templates.get(key)
            if template is None:
                template = self._templates[key] = _Envelope.build(self.app, channel, *key)
            by_queue.setdefault(queue, []).append(template.render(ids, tier))
        with channel.conn_or_acquire() as client:  # kombu's client adds global_keyprefix to each key
            pipe = client.pipeline(transaction=False)
            for queue, messages in by_queue.items():
                for start in range(0, len(messages), _LPUSH_CHUNK):
                    # LPUSH k m1 m2 … leaves m1 nearest the tail, where BRPOP takes from: order is kept.
                    pipe.lpush(queue, *messages[start: start + _LPUSH_CHUNK])
            pipe.execute()

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting on every tier queue this app declares (``tiers`` at connect, plus any it
        published to since), on validate and on audit."""
        declared = [name for name in self.app.amqp.queues if is_tier_queue(name)]
        queues = [*sorted(declared, key=lambda name: int(name[4:])), VALIDATE_QUEUE, AUDIT_QUEUE]
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is None:  # not Redis: ask the broker by declaring each queue as it is declared everywhere
                # (idempotent; a passive declare of a queue no worker declared yet would close the channel)
                defined = self.app.amqp.queues
                # py-amqp answers (name, message_count, consumer_count); kombu's stubs say str
                return {q: int(getattr(defined[q](channel).queue_declare(), "message_count", 0)) for q in queues}
            # kombu's client adds global_keyprefix to LLEN itself.
            return {q: int(client.llen(q)) for q in queues}

    def close(self) -> None:
        self.app.close()


def _task(stage: Stage) -> str:
    return {Stage.CALL: CALL_TASK, Stage.VALIDATE: VALIDATE_TASK, Stage.AUDIT: AUDIT_TASK}[stage]


def _is_redis(producer: Any) -> bool:  # Any: a kombu Producer
    return bool(producer.connection.transport.driver_type == "redis" and
                hasattr(producer.channel, "conn_or_acquire"))


class _Envelope:
    """The Redis envelope of one task on one queue, serialized once, with holes for what differs per message.

    Built by the same calls ``send_task`` makes (``amqp.create_task_message``, kombu's JSON serializer,
    ``channel.prepare_message``, the channel's body encoding), with sentinels where the task id, the
    arguments, the delivery tag and the body go.
    """

    _ID, _TAG, _BODY = "@@cascade-id@@", "@@cascade-tag@@", "@@cascade-body@@"
    _JOB, _TIER = 987654321012345678, 876543219
    _ARGS = f"[{_JOB}], {_TIER}"
    _HOLES = re.compile("|".join(re.escape(h) for h in (_ID, _TAG, _BODY, _ARGS)))

    def __init__(self, parts: list[str], holes: list[str], body: tuple[str, str], encoding: str) -> None:
        self.parts, self.holes, self.body, self.encoding = parts, holes, body, encoding

    @classmethod
    def build(cls, app: Celery, channel: Any, name: str, queue: str) -> _Envelope:  # Any: a kombu channel
        from kombu.serialization import dumps as serialize
        from kombu.utils.json import dumps as to_json

        task = app.amqp.create_task_message(cls._ID, name, [[cls._JOB], cls._TIER], {}, reply_to=app.thread_oid,
                                            ignore_result=None)
        content_type, content_encoding, data = serialize(task.body, serializer="json")
        message = channel.prepare_message(data, 0, content_type, content_encoding, task.headers,
                                          {**task.properties, "delivery_mode": 2})
        _, encoding = channel.encode_body(data, channel.body_encoding)
        message["body"] = cls._BODY
        message["properties"].update(body_encoding=encoding, delivery_tag=cls._TAG)
        message["properties"]["delivery_info"].update(exchange="", routing_key=queue)
        text = to_json(message)
        pre, _, post = data.partition(cls._ARGS)
        return cls(cls._HOLES.split(text), cls._HOLES.findall(text), (pre, post), encoding)

    def render(self, job_ids: list[int], tier: int) -> str:
        args = f"[{', '.join(map(str, job_ids))}], {tier}"
        data = (self.body[0] + args + self.body[1]).encode()
        body = base64.b64encode(data).decode() if self.encoding == "base64" else data.decode()
        values = {self._ID: str(uuid.uuid4()), self._TAG: str(uuid.uuid4()), self._BODY: body, self._ARGS: args}
        out = [self.parts[0]]
        for hole, part in zip(self.holes, self.parts[1:], strict=True):
            out += (values[hole], part)
        return "".join(out)
