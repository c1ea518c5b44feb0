"""Start tiers end to end: the learned start tier follows the models' history; route rules pick from the row."""

from __future__ import annotations

from decimal import Decimal

import pytest

from cascade.client import Client
from cascade.config import parse_config
from cascade.publish import CeleryPublisher
from cascade.routing import EXPLORE, LEARNED, explores
from cascade.sim import SimConfig, SimModel

pytestmark = pytest.mark.integration

PRICES = {"small": "0.5", "medium": "4", "large": "20"}


def _client(env, sim_url, **task):
    models = [{"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10,
               "price": {"input_per_mtok": price, "output_per_mtok": price}} for name, price in PRICES.items()]
    config = {"models": models, "task_types": [{
        "name": "label", "prompt": "Ticket {id}: {text}", "output": "json",
        "self_consistency": {"samples": 3, "min_agreement": 0.6},
        "tiers": ["small", "medium", {"model": "large", "samples": 1}], **task}]}
    settings = env.settings()
    return Client(settings, engine=env.engine, config=parse_config(config, "test.yaml"),
                  publisher=CeleryPublisher.connect(settings, settings.broker_url))


def _rows(tag, n, **extra):
    return [{"id": f"{tag}-{i}", "text": f"ticket {i}", **extra} for i in range(n)]


def _run(client, rows):
    batch = client.submit("label", rows, key_field="id").batch_id
    assert client.wait(batch, timeout=60, poll_s=0.05).is_done
    return batch


def _jobs(env, batch):
    """Per key: (start tier, route, final tier, status, cost)."""
    return {r.key: (r.start_tier, r.route, r.tier, r.status, r.cost_usd) for r in env.rows(
        "SELECT key, start_tier, route, tier, status, cost_usd FROM jobs WHERE batch_id = :b", b=batch)}


def _avg_cost(jobs):
    return sum(j[4] for j in jobs.values()) / len(jobs)


def test_the_learned_start_tier_skips_a_failing_tier_and_comes_back_when_it_recovers(env, sim, workers):
    # Given a tier 1 whose samples are never valid, a learned start tier (10 % explore, 20-job windows)
    broken = SimConfig(seed=2, models={"small": SimModel(p_invalid_json=1.0), "medium": SimModel(),
                                       "large": SimModel()})
    server = sim(broken)
    client = _client(env, server.url, routing={"start": "learned", "explore": 0.1, "window": 20, "min_jobs": 10})
    workers(concurrency=32)

    # When a first batch runs with no history
    first = _jobs(env, _run(client, _rows("a", 30)))
    # Then every job starts at tier 1 (recorded as learned) and escalates to tier 2, where it succeeds
    assert {j[:4] for j in first.values()} == {(1, LEARNED, 2, "succeeded")}

    # When the next batch runs, with tier 1's window full of failures
    batch = _run(client, _rows("b", 60))
    second = _jobs(env, batch)
    # Then its jobs start at tier 2 except the explore share (by a stable hash of batch and key), every job
    # still succeeds, and a job costs less than before
    exploring = {k for k in second if explores(batch, k, Decimal("0.1"))}
    assert 1 <= len(exploring) <= 15
    assert {k: j[:2] for k, j in second.items()} == {
        k: (1, EXPLORE) if k in exploring else (2, LEARNED) for k in second}
    assert all(j[2:4] == (2, "succeeded") for j in second.values())
    assert _avg_cost(second) < _avg_cost(first)
    # And escalation_stats counts the skipped jobs, and no escalation for those that ended where they started
    finished = len(first) + len(second)
    stats = client.stats("label")[0]
    assert float(stats["escalation_rate"]) == pytest.approx((len(first) + len(exploring)) / finished)
    assert float(stats["skipped_rate"]) == pytest.approx((len(second) - len(exploring)) / finished)

    # When tier 1 recovers and batches go on, its explore jobs pass again
    server.reconfigure(SimConfig(seed=2))
    starts = []
    for round_ in range(4):
        jobs = _jobs(env, _run(client, _rows(f"c{round_}", 60)))
        assert all(j[3] == "succeeded" for j in jobs.values())
        starts.append({j[0] for j in jobs.values() if j[1] == LEARNED})
        if starts[-1] == {1}:
            break
    # Then the learned start tier returns to tier 1 (one batch after the explore jobs refilled its window)
    assert starts[-1] == {1}, starts
    assert len(starts) <= 3, starts


def test_route_rules_pick_the_start_tier_from_the_row(env, sim, workers):
    # Given rules: long texts start at tier 2, high-priority rows at tier 3
    server = sim(SimConfig(seed=4))
    client = _client(env, server.url, route=[
        {"when": {"field": "text", "min_chars": 40}, "start_tier": 2},
        {"when": {"field": "priority", "in": ["high", "urgent"]}, "start_tier": 3, "name": "vip"}])
    workers(concurrency=16)
    rows = [*_rows("short", 4, priority="low"), *_rows("vip", 3, priority="high"),
            {"id": "long-vip", "text": "x" * 50, "priority": "urgent"}]
    # When the batch runs
    batch = _run(client, rows)
    jobs = _jobs(env, batch)
    # Then each row started where its first matching rule says, and the rule is recorded
    assert {k: j[:3] for k, j in jobs.items()} == {
        **{f"short-{i}": (1, None, 1) for i in range(4)}, **{f"vip-{i}": (3, "vip", 3) for i in range(3)},
        "long-vip": (2, "route[0]", 2)}
    # And the batch's status counts where its jobs started
    assert client.status(batch, notes=True).starts == [(1, "default", 4), (2, "route[0]", 1), (3, "vip", 3)]
    # And a job that starts at tier 3 made no request below it
    assert env.scalar("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id "
                      "WHERE a.tier < j.start_tier") == 0
