"""cascade.yaml (models and task types) and the environment settings.

``load_config`` turns a YAML file into frozen pydantic models; every problem becomes a
``ConfigError`` naming the file and the dotted path of the field. A batch stores a
``TaskSnapshot`` (its task type plus the models its tiers use), so editing cascade.yaml
changes new batches only.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cascade.errors import ConfigError

__all__ = [
    "Audit",
    "CascadeConfig",
    "CascadeSettings",
    "Length",
    "ModelConfig",
    "Price",
    "ResolvedTier",
    "RouteRule",
    "RouteWhen",
    "Routing",
    "SelfConsistency",
    "TaskSnapshot",
    "TaskType",
    "TierConfig",
    "Variant",
    "is_redis_url",
    "load_config",
    "load_settings",
    "render",
    "template_fields",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Frozen):
    """USD per million tokens. ``cached_input_per_mtok`` prices the prompt tokens the provider served from
    its prompt cache (``usage.prompt_tokens_details.cached_tokens``); unset, they cost ``input_per_mtok``."""

    input_per_mtok: Decimal = Field(Decimal(0), ge=0)
    output_per_mtok: Decimal = Field(Decimal(0), ge=0)
    cached_input_per_mtok: Decimal | None = Field(None, ge=0)

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Decimal:
        """Exact cost of a request, as providers bill it: tokens × price, never rounded. ``cached_tokens`` are
        part of ``input_tokens``."""
        cached = min(max(cached_tokens, 0), input_tokens)
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        return ((input_tokens - cached) * self.input_per_mtok + cached * cached_price
                + output_tokens * self.output_per_mtok) / Decimal(1_000_000)


class ModelConfig(_Frozen):
    """One OpenAI-compatible model endpoint."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    price: Price = Price()
    timeout_s: float = Field(30.0, gt=0)
    rate_limit_rpm: int | None = Field(None, gt=0)
    # Tokens per minute, prompt + completion; shared by every worker like rate_limit_rpm (cascade.ratelimit).
    rate_limit_tpm: int | None = Field(None, gt=0)
    supports_n: bool = True
    max_retries: int = Field(3, ge=0, le=10)
    # o-series and other reasoning models take max_completion_tokens instead of max_tokens.
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # false: this model's answers are never read from or written to the request cache (cascade.cache)
    cache: bool = True


class Variant(_Frozen):
    """One prompt of a mixture: its samples are voted together with the other variants'."""

    name: str
    prompt: str
    system: str | None = None
    samples: int = Field(1, ge=1, le=64)


class Length(_Frozen):
    min_chars: int = Field(0, ge=0)
    max_chars: int = Field(100_000, ge=1)


class SelfConsistency(_Frozen):
    samples: int = Field(1, ge=1, le=64)
    min_agreement: Decimal = Field(Decimal("0.5"), ge=0, le=1)
    fields: list[str] | None = None
    variants: list[Variant] | None = None


class TierConfig(_Frozen):
    """A tier given as an object; unset fields inherit from the task type."""

    model: str
    samples: int | None = Field(None, ge=1, le=64)
    min_agreement: Decimal | None = Field(None, ge=0, le=1)
    variants: list[Variant] | None = None
    system: str | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # None: the task type's. An explicit `temperature: null` in the file sends no temperature at all (models
    # that accept only their default); it is kept as no_temperature so a stored snapshot says the same.
    temperature: float | None = Field(None, ge=0, le=2)
    no_temperature: bool = False
    # Backups of the same class, in order: a request that fails with a provider fault (5xx, timeout, lost
    # connection, 429 past its patience) goes to the next healthy one; it never escalates the job.
    fallbacks: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _explicit_null_temperature(cls, data: Any) -> Any:  # Any: the raw YAML mapping
        if isinstance(data, dict) and "no_temperature" not in data and "temperature" in data \
                and data["temperature"] is None:
            return {**{k: v for k, v in data.items() if k != "temperature"}, "no_temperature": True}
        return data


class Budget(_Frozen):
    """A task type's cap on spend over any 24 hours, across all its batches."""

    per_day_usd: Decimal = Field(gt=0)


class Audit(_Frozen):
    """Re-run a share of the jobs accepted below the top tier on a bigger model and compare the answers
    (``cascade.stages.audit``): the jobs are picked by a stable hash of their id, so a rate of 0.05 audits
    the same jobs every time it is asked."""

    rate: Decimal = Field(ge=0, le=1)
    #: a model name of cascade.yaml; None: the last tier's. A tier's model runs with that tier's settings.
    model: str | None = None


class Routing(_Frozen):
    """``start: learned``: each batch's jobs start at the tier with the lowest expected cost per finished job,
    from the task type's recent history (``cascade.routing``); an ``explore`` share still starts at tier 1."""

    start: Literal["first", "learned"] = "first"
    explore: Decimal = Field(Decimal("0.05"), ge=0, le=1)
    #: the most recent finished jobs of each tier that the estimate reads
    window: int = Field(500, ge=1, le=100_000)
    #: a tier with fewer finished jobs in its window is never a start tier (too little history)
    min_jobs: int = Field(20, ge=1)


#: The longest ``matches:`` pattern and the most characters of a field it reads: a rule runs on every row of a
#: batch at submission, so neither may be unbounded.
MAX_PATTERN_CHARS = 200
MAX_MATCHED_CHARS = 10_000


class RouteWhen(_Frozen):
    """A rule's condition on one field of the row; every condition given must hold. A row without the field
    never matches."""

    field: str = Field(min_length=1)
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    equals: str | int | float | bool | None = None
    in_: list[str | int | float | bool] | None = Field(None, alias="in", min_length=1)
    matches: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("matches")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _some_condition(self) -> RouteWhen:
        given = self.model_fields_set - {"field"}
        if not given:
            raise ValueError("needs a condition: min_chars, max_chars, equals, in or matches")
        return self


class RouteRule(_Frozen):
    """``- {when: {field: text, min_chars: 4000}, start_tier: 2}``: rows it matches start at ``start_tier``."""

    when: RouteWhen
    start_tier: int = Field(ge=1)
    #: how jobs.route names the rule; None: ``route[i]``
    name: str | None = None


class TaskType(_Frozen):
    name: str
    system: str = ""
    prompt: str
    output: Literal["json", "text"] = "text"
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # Any: a JSON Schema document
    length: Length = Length()
    self_consistency: SelfConsistency = SelfConsistency()
    tiers: list[str | TierConfig] = Field(min_length=1)
    max_tokens: int = Field(512, ge=1)
    # null: send no temperature (o-series and some other models accept only their default)
    temperature: float | None = Field(0.7, ge=0, le=2)
    on_exhausted: Literal["fail", "accept_last"] = "fail"
    # A request that can never succeed (bad key, unknown model, unsupported parameter): halt the batch until
    # it is fixed and resumed (`cascade retry BATCH`), or escalate as a failed tier.
    on_config_error: Literal["halt", "escalate"] = "halt"
    # false: this task type's requests never use the request cache (cascade.cache), reads or writes
    cache: bool = True
    # Every model of a tier down (cascade.health): wait in Postgres for one to come back, at most
    # outage_wait_s, then escalate as model_error:unavailable; or escalate at once.
    on_outage: Literal["wait", "escalate"] = "wait"
    outage_wait_s: float = Field(900.0, gt=0)
    # A rolling 24 h cap over all its batches, enforced like a batch's --max-cost (cascade.store.budget).
    budget: Budget | None = None
    #: quality audits of the answers accepted below the top tier (``routing_accuracy``)
    audit: Audit | None = None
    #: how a job's start tier is chosen when no ``route`` rule matches it
    routing: Routing = Routing()
    #: rules picking a row's start tier, in order; the first that matches wins
    route: list[RouteRule] = Field(default_factory=list)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                Draft202012Validator.check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value


class ResolvedTier(_Frozen):
    """A tier with every override applied: what a worker needs to run it."""

    index: int  # 1-based, as stored in jobs.tier
    model: ModelConfig
    samples: int
    min_agreement: Decimal
    variants: list[Variant] | None
    system: str
    prompt: str
    max_tokens: int
    temperature: float | None  # None: none is sent
    #: the tier's backups, in order (``TierConfig.fallbacks``)
    fallbacks: list[ModelConfig] = []

    @property
    def chain(self) -> list[ModelConfig]:
        """The tier's model, then its fallbacks."""
        return [self.model, *self.fallbacks]

    def using(self, model: ModelConfig) -> ResolvedTier:
        """This tier with ``model`` called instead (a fallback)."""
        return self if model is self.model else self.model_copy(update={"model": model})


class TaskSnapshot(_Frozen):
    """What a batch stores: its task type and the models its tiers name."""

    task_type: TaskType
    models: dict[str, ModelConfig]
    #: False: this batch was submitted with --no-cache: its requests all go out (their answers are still
    #: written to the cache). Not part of ``config_hash``: it changes what is paid, not what is asked.
    cache_reads: bool = True
    #: the batch's cap on spend (``--max-cost``): no request goes out unless its cost's upper bound fits in
    #: what is left (``cascade.stages.budget``). Not part of ``config_hash`` either.
    max_cost_usd: Decimal | None = Field(None, gt=0)

    def caches(self, tier: ResolvedTier) -> bool:
        """Whether the tier's requests are written to the request cache (task type and model allow it)."""
        return self.task_type.cache and tier.model.cache

    @property
    def tier_count(self) -> int:
        return len(self.task_type.tiers)

    def tier(self, index: int) -> ResolvedTier:
        """The resolved tier ``index`` (1-based)."""
        spec = self.task_type.tiers[index - 1]
        return self._resolve(index, TierConfig(model=spec) if isinstance(spec, str) else spec)

    def audit_tier(self) -> ResolvedTier | None:
        """The tier an audit runs (``index`` 0, as its attempts are recorded): the last tier whose model is the
        audit's model, with that tier's settings (samples, votes, prompts); a model no tier uses gets the task
        type's settings. None: the task type has no audits."""
        audit = self.task_type.audit
        if audit is None:
            return None
        model = audit.model or self.tier(self.tier_count).model.name
        for index in range(self.tier_count, 0, -1):
            tier = self.tier(index)
            if tier.model.name == model:
                return tier.model_copy(update={"index": 0, "fallbacks": []})
        return self._resolve(0, TierConfig(model=model))

    def _resolve(self, index: int, over: TierConfig) -> ResolvedTier:
        task = self.task_type
        sc = task.self_consistency
        variants = over.variants if over.variants is not None else (sc.variants if over.samples is None else None)
        samples = sum(v.samples for v in variants) if variants else (over.samples or sc.samples)
        return ResolvedTier(
            index=index,
            model=self.models[over.model],
            samples=samples,
            min_agreement=over.min_agreement if over.min_agreement is not None else sc.min_agreement,
            variants=variants,
            system=over.system if over.system is not None else task.system,
            prompt=over.prompt if over.prompt is not None else task.prompt,
            max_tokens=over.max_tokens or task.max_tokens,
            temperature=None if over.no_temperature else (
                over.temperature if over.temperature is not None else task.temperature),
            fallbacks=[self.models[name] for name in over.fallbacks],
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def config_hash(self) -> str:
        data = self.to_json()
        del data["cache_reads"], data["max_cost_usd"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class CascadeConfig(_Frozen):
    models: list[ModelConfig]
    task_types: list[TaskType]

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def task(self, name: str) -> TaskType:
        """The task type called ``name``; ConfigError names the known ones otherwise."""
        for task in self.task_types:
            if task.name == name:
                return task
        known = ", ".join(sorted(t.name for t in self.task_types))
        raise ConfigError(f"unknown task type {name!r} (known: {known})")

    def snapshot(self, name: str, *, cache_reads: bool = True, max_cost_usd: Decimal | None = None) -> TaskSnapshot:
        """What a batch of task type ``name`` stores; ``cache_reads`` False: its requests skip cache reads;
        ``max_cost_usd``: its cap on spend."""
        task = self.task(name)
        used = {t if isinstance(t, str) else t.model for t in task.tiers}
        used.update([task.audit.model] if task.audit is not None and task.audit.model else [])
        used.update(f for t in task.tiers if not isinstance(t, str) for f in t.fallbacks)
        return TaskSnapshot(task_type=task, models={m.name: m for m in self.models if m.name in used},
                            cache_reads=cache_reads, max_cost_usd=max_cost_usd)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a prompt template uses, in order; ValueError for anything but plain names."""
    names: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{field}}} is not a plain field name (no attributes, indexes or formats)")
        if field not in names:
            names.append(field)
    return names


def render(template: str, row: dict[str, Any]) -> str:
    """Fill a template's ``{field}`` placeholders from a row (non-strings as JSON)."""
    values = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()}
    return template.format_map(values)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "TierConfig"})


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _templates(task: TaskType) -> list[tuple[str, str]]:
    """(field path, template) of every prompt and system text of a task type, tiers and variants included."""
    out = [("prompt", task.prompt), ("system", task.system)]
    for k, v in enumerate(task.self_consistency.variants or []):
        out += [(f"self_consistency.variants[{k}].prompt", v.prompt), (f"self_consistency.variants[{k}].system",
                                                                         v.system or "")]
    for j, tier in enumerate(task.tiers):
        if isinstance(tier, TierConfig):
            out += [(f"tiers[{j}].prompt", tier.prompt or ""), (f"tiers[{j}].system", tier.system or "")]
            for k, v in enumerate(tier.variants or []):
                out += [(f"tiers[{j}].variants[{k}].prompt", v.prompt),
                        (f"tiers[{j}].variants[{k}].system", v.system or "")]
    return out


def _check_references(config: CascadeConfig, file: str) -> None:
    models = {m.name for m in config.models}
    seen: set[str] = set()
    for i, task in enumerate(config.task_types):
        if task.name in seen:
            raise ConfigError(f"duplicate task type {task.name!r}", file=file, path=f"task_types[{i}].name")
        seen.add(task.name)
        _check_tiers(task, models, file, i)
        for path, text in _templates(task):
            try:
                template_fields(text)
            except ValueError as exc:
                raise ConfigError(str(exc), file=file, path=f"task_types[{i}].{path}") from None
        _check_routing(task, models, file, f"task_types[{i}]")
        if task.output == "text" and task.schema_ is not None:
            raise ConfigError("a schema needs output: json", file=file, path=f"task_types[{i}].schema")


def _check_tiers(task: TaskType, models: set[str], file: str, i: int) -> None:
    """Every tier's model and fallbacks exist, and no fallback repeats a model of its tier."""
    for j, tier in enumerate(task.tiers):
        name = tier if isinstance(tier, str) else tier.model
        if name not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ConfigError(f"unknown model {name!r} (known: {known})", file=file, path=f"task_types[{i}].tiers[{j}]")
        backups = [] if isinstance(tier, str) else tier.fallbacks
        for k, backup in enumerate(backups):
            where = f"task_types[{i}].tiers[{j}].fallbacks[{k}]"
            if backup not in models:
                known = ", ".join(sorted(models)) or "none"
                raise ConfigError(f"unknown model {backup!r} (known: {known})", file=file, path=where)
            if backup == name or backup in backups[:k]:
                raise ConfigError(f"fallback {backup!r} is already in the tier (its model or an earlier "
                                  "fallback)", file=file, path=where)


def _check_routing(task: TaskType, models: set[str], file: str, where: str) -> None:
    """The audit's model exists; every route rule's start tier is one of the task type's tiers."""
    if task.audit is not None and task.audit.model is not None and task.audit.model not in models:
        known = ", ".join(sorted(models)) or "none"
        raise ConfigError(f"unknown model {task.audit.model!r} (known: {known})", file=file, path=f"{where}.audit.model")
    for k, rule in enumerate(task.route):
        if rule.start_tier > len(task.tiers):
            raise ConfigError(f"start_tier {rule.start_tier} is out of range: the task type has {len(task.tiers)} "
                              "tiers", file=file, path=f"{where}.route[{k}].start_tier")


def parse_config(data: Any, file: str) -> CascadeConfig:  # Any: parsed YAML
    """Validate already-parsed YAML; ConfigError names ``file`` and the field path."""
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with 'models' and 'task_types'", file=file)
    dup = [m.get("name") for m in data.get("models") or [] if isinstance(m, dict)]
    try:
        config = CascadeConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A tier is `str | TierConfig`: pydantic reports both branches; the object's error is the useful one.
        err = next((e for e in errors if e["loc"][-1:] != ("str",)), errors[0])
        loc = tuple(part for part in err["loc"] if part not in _UNION_TAGS)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc[-2:-1] == ("when",):
            message = (f"unknown condition {loc[-1]!r} (known: min_chars, max_chars, equals, in, matches); "
                       + message)
        raise ConfigError(message, file=file, path=_loc(loc)) from None
    if len(set(dup)) != len(dup):
        raise ConfigError("duplicate model name", file=file, path="models")
    _check_references(config, file)
    return config


def load_config(path: str | Path) -> CascadeConfig:
    """Read and validate cascade.yaml. Raises ConfigError naming the file and field."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=file) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=file, path=where) from None
    return parse_config(data, file)


class CascadeSettings(BaseSettings):
    """Environment settings (``CASCADE_*``). No URL means the embedded stack (demo and dev only)."""

    model_config = SettingsConfigDict(env_prefix="CASCADE_", frozen=True, extra="ignore")

    database_url: str | None = None
    # Postgres schema holding cascade's tables (search_path); None means the server's default.
    db_schema: str | None = None
    # transaction: CASCADE_DATABASE_URL is a PgBouncer in transaction pooling mode (no prepared statements or
    # session settings; see cascade.store.engine). Run `cascade db upgrade` against Postgres itself.
    database_pooler: Literal["none", "transaction"] = "none"
    # Postgres connections a worker process holds at most, whatever its concurrency: its stages' transactions are
    # short and take turns (docs/scale-out.md measures what more would buy). Two at least: a sweep holds its lock's
    # transaction while it works in another.
    worker_db_connections: int = Field(2, ge=2, le=64)
    broker_url: str | None = None
    # The Redis holding what every worker shares besides messages: rate-limit buckets and model health
    # (cascade.ratelimit, cascade.health). None: the broker's, when the broker is Redis; with a RabbitMQ broker
    # set it, or models with rate limits cannot be called and circuit breakers are off.
    redis_url: str | None = None
    # RabbitMQ only: the type of the queues cascade declares. auto: quorum on RabbitMQ 3.8 and later (replicated,
    # durable), classic before. A queue keeps its type: to switch an existing deployment, delete its queues.
    amqp_queue_type: Literal["auto", "quorum", "classic"] = "auto"
    config: Path = Path("cascade.yaml")
    # Redis visibility timeout: must exceed the longest request with its retries (CELERY-NOTES §1).
    visibility_timeout_s: int = 3600
    # How long a claim lasts unless renewed. A worker's heartbeat renews the claims it is working on, so a
    # live worker's slow request is never taken away; only a claim no process holds any more (a leak, or
    # a stage run in-process without a heartbeat) reaches it.
    lease_s: int = 300
    # Workers refresh their row in `workers` this often; the sweeper takes back the jobs of a worker not
    # seen for worker_dead_after_s (kill -9, a frozen process, a lost network). Three missed beats: a
    # garbage-collection pause or a Postgres blip never looks like a death.
    heartbeat_s: float = Field(5.0, gt=0)
    worker_dead_after_s: float = Field(15.0, gt=0)
    # Waits longer than this (Retry-After, backoff) go to Postgres (not_before) instead of sleeping.
    max_inline_wait_s: float = 5.0
    # Celery beat's sweep (workers/app.py): how often, and how old a queued job's last publish must be.
    # `cascade sweep --every` defaults to the first; the second is also `cascade sweep --stalled-after`'s.
    # A dead worker's jobs are back in a queue within worker_dead_after_s + sweep_every_s (running ones) or
    # stalled_after_s + sweep_every_s (reserved but not started).
    sweep_every_s: float = Field(5.0, gt=0)
    stalled_after_s: float = Field(20.0, gt=0)
    # Celery's worker_prefetch_multiplier: see cascade.publish.celery_config (use 1 with prefork workers).
    prefetch_multiplier: int = 4
    # Job ids per stage message: the jobs of a message share its Celery and Postgres costs and their requests
    # go out together (a worker slot holds up to this many jobs; 1 gives one job per message).
    jobs_per_message: int = Field(16, ge=1, le=1000)
    # The Redis key prefix of every broker key (isolates test runs and tenants on one Redis).
    key_prefix: str = ""
    data_dir: Path = Path(".cascade")
    # A model with this many provider faults in a row (every worker counted) is down for breaker_cooldown_s,
    # then gets one probe request (cascade.health explains the defaults).
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    # Request cache entries older than this are misses (and `cascade cache prune`'s default age); None: none
    # expires.
    cache_ttl_s: float | None = Field(None, gt=0)

    @property
    def shared_redis_url(self) -> str | None:
        """Where rate limits and model health live: ``redis_url``, else a Redis broker's URL, else None."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url and is_redis_url(self.broker_url) else None

    @model_validator(mode="after")
    def _beats_before_death(self) -> CascadeSettings:
        if self.lease_s < 3 * self.heartbeat_s:
            raise ValueError(f"lease_s ({self.lease_s}) must be at least three times heartbeat_s ({self.heartbeat_s}): "
                             "a heartbeat renews a lease in its second half, and needs a beat to spare")
        if self.worker_dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"worker_dead_after_s ({self.worker_dead_after_s}) must be at least twice heartbeat_s "
                             f"({self.heartbeat_s}): one late beat would look like a dead worker")
        return self


def is_redis_url(url: str) -> bool:
    """Whether a broker URL is a Redis one (``redis://``, ``rediss://``, ``redis+socket://``), not AMQP."""
    return url.split(":", 1)[0] in ("redis", "rediss", "redis+socket", "socket", "unix")


def load_settings(**overrides: Any) -> CascadeSettings:  # Any: explicit values beat the environment
    """Settings from the environment, with explicit overrides (CLI flags) taking precedence."""
    try:
        return CascadeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a check across settings (_beats_before_death): its message starts with the field
            message = err["msg"].removeprefix("Value error, ")
            raise ConfigError(message, file="environment", path="CASCADE_" + message.split(" ", 1)[0].upper()) from None
        name = "CASCADE_" + "_".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(f"{err['msg']} (got {err.get('input')!r})", file="environment", path=name) from None
