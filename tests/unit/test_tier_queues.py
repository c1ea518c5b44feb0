"""Tier queues follow the config (cascade.publish.tier_count, configured_tiers, declare_tier_queues)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from celery import Celery
from celery.exceptions import QueueNotFound

from cascade.config import CascadeSettings, parse_config
from cascade.publish import (
    MIN_TIERS,
    all_queues,
    celery_config,
    configured_tiers,
    declare_tier_queues,
    is_tier_queue,
    tier_count,
    worker_queues,
)


def _config(*tier_counts: int) -> dict:
    models = [{"name": f"m{i}", "base_url": "http://sim/v1", "model": f"m{i}"} for i in range(1, 7)]
    tasks = [{"name": f"t{k}", "prompt": "{text}", "tiers": [f"m{i}" for i in range(1, n + 1)]}
             for k, n in enumerate(tier_counts)]
    return {"models": models, "task_types": tasks}


@pytest.mark.parametrize(("tier_counts", "expected"), [
    ((), MIN_TIERS),  # no config at all
    ((1,), 3),  # fewer tiers than the minimum: tier1..tier3 stay declared
    ((3, 2), 3),
    ((2, 4), 4),  # the longest cascade of any task type
    ((6, 1, 5), 6),
])
def test_tier_count_is_the_longest_cascade_and_at_least_three(tier_counts, expected):
    config = parse_config(_config(*tier_counts), "cascade.yaml") if tier_counts else None
    assert tier_count(config) == expected


def test_queue_lists_follow_the_tier_count():
    assert worker_queues() == ["tier1", "tier2", "tier3", "validate", "audit"]
    assert worker_queues(4) == ["tier1", "tier2", "tier3", "tier4", "validate", "audit"]
    assert all_queues(4) == ["tier1", "tier2", "tier3", "tier4", "validate", "audit", "sweep"]
    assert [is_tier_queue(q) for q in ("tier1", "tier12", "tier0", "tier", "tier1x", "validate")] == [
        True, True, False, False, False, False]


def test_configured_tiers_reads_the_config_file(tmp_path: Path, caplog):
    # Given a four-tier config file, a missing one and a broken one
    good, broken = tmp_path / "good.yaml", tmp_path / "broken.yaml"
    good.write_text(yaml.safe_dump(_config(2, 4)))
    broken.write_text("models: [\n")
    # Then the good one declares four tier queues, the others the minimum (a broken one with a warning)
    assert configured_tiers(CascadeSettings(config=good)) == 4
    assert configured_tiers(CascadeSettings(config=tmp_path / "missing.yaml")) == MIN_TIERS
    with caplog.at_level(logging.WARNING, logger="cascade.publish"):
        assert configured_tiers(CascadeSettings(config=broken)) == MIN_TIERS
    assert "broken.yaml" in caplog.text


def _app(tiers: int) -> Celery:
    app = Celery("test-tier-queues", set_as_current=False)
    app.conf.update(celery_config(CascadeSettings(), "memory://", tiers))
    return app


def _routes(app: Celery, queue: str) -> str:
    return str(app.amqp.router.route({"queue": queue}, "cascade.call_model")["queue"].name)


def test_celery_config_declares_every_tier_queue():
    app = _app(4)
    assert [q.name for q in app.conf.task_queues] == all_queues(4)
    assert app.conf.task_create_missing_queues is False
    assert _routes(app, "tier4") == "tier4"


def test_a_tier_queue_beyond_the_config_is_declared_on_demand_and_nothing_else():
    # Given an app configured for three tiers
    app = _app(3)
    with pytest.raises(QueueNotFound):
        _routes(app, "tier5")
    # When tier5 and a misspelt queue are asked for
    declare_tier_queues(app, ["tier5", "tier1", "valdate"])
    # Then tier5 routes, and the misspelt name is still unknown
    assert _routes(app, "tier5") == "tier5"
    assert "valdate" not in app.amqp.queues
    with pytest.raises(QueueNotFound):
        _routes(app, "valdate")


def test_each_queue_is_bound_only_under_its_own_name():
    # A queue without an exchange of its own would be bound to the default queue's exchange and key (validate):
    # a publish there would land in every queue
    for queue in _app(3).conf.task_queues:
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key, queue.durable) == (
            queue.name, "direct", queue.name, True)
        assert queue.queue_arguments is None


@pytest.mark.parametrize(("queue_type", "arguments"), [("quorum", {"x-queue-type": "quorum"}), ("classic", None)])
def test_rabbitmq_queues_are_quorum_queues_and_publishes_are_confirmed(queue_type, arguments):
    config = celery_config(CascadeSettings(amqp_queue_type=queue_type), "amqp://guest@rabbit//", 3)
    assert {str(q.name): q.queue_arguments for q in config["task_queues"]} == dict.fromkeys(all_queues(3), arguments)
    assert config["broker_transport_options"] == {"confirm_publish": True}


def test_a_rate_limited_model_behind_rabbitmq_needs_a_shared_redis():
    from cascade.config import ModelConfig
    from cascade.providers import ProviderPool
    from cascade.stages import StageContext

    limited = ModelConfig(name="m", base_url="http://x", model="m", rate_limit_rpm=60)
    free = ModelConfig(name="f", base_url="http://x", model="f")

    def ctx(**settings):
        return StageContext(None, None, ProviderPool(), CascadeSettings(**settings))  # type: ignore[arg-type]

    rabbit = ctx(broker_url="amqp://guest@rabbit//")
    assert "CASCADE_REDIS_URL" in (rabbit.missing_shared_state(limited) or "")
    assert rabbit.missing_shared_state(free) is None
    assert ctx(broker_url="amqp://guest@rabbit//", redis_url="redis://r/0").missing_shared_state(limited) is None
    assert ctx(broker_url="redis://r/0").missing_shared_state(limited) is None
    assert ctx(broker_url="amqp://guest@rabbit//", redis_url="redis://r/1").settings.shared_redis_url == "redis://r/1"
    assert ctx(broker_url="redis://r/0").settings.shared_redis_url == "redis://r/0"
    assert rabbit.settings.shared_redis_url is None
