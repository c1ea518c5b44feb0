"""The bulk publish path (cascade/publish.py) and the benchmarks (bench/): real Redis, Postgres and workers.

Benchmarks are not part of the suite; this only checks that each one runs on a tiny size.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from cascade.publish import BULK_MIN, CeleryPublisher
from cascade.store import Stage
from tests.conftest import ROOT
from tests.integration import scenario
from tests.integration.audit import audit as _audit
from tests.integration.audit import client as _client

pytestmark = pytest.mark.integration

#: Differ from message to message; everything else must be what send_task writes.
PER_MESSAGE = {("headers", "id"), ("headers", "root_id"), ("headers", "argsrepr"), ("properties", "correlation_id"),
               ("properties", "delivery_tag"), ("body",)}


def _flatten(value, path=()):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, (*path, key)))
        return out
    return {path: value}


def _queued(env, queue):
    client = env_redis(env)
    try:
        return [json.loads(raw) for raw in reversed(client.lrange(env.prefix + queue, 0, -1))]
    finally:
        client.close()


def env_redis(env):
    import redis

    from cascade.ratelimit import redis_url

    return redis.Redis.from_url(redis_url(env.services.broker_url))


def test_bulk_messages_are_what_send_task_writes(env):
    # Given a publisher on the test's key prefix, three job ids per message
    settings = env.settings(jobs_per_message=3)
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    # When one message goes through send_task and BULK_MIN through the bulk path, to two queues
    publisher.publish([(7, 2, Stage.CALL)])
    publisher.publish([(100 + i, 2, Stage.CALL if i % 2 else Stage.VALIDATE) for i in range(3 * BULK_MIN)])
    publisher.close()
    # Then each queue holds its messages in publish order, each with three ids of its stage in order
    calls, validations = _queued(env, "tier2"), _queued(env, "validate")
    odd, even = [100 + i for i in range(3 * BULK_MIN) if i % 2], [100 + i for i in range(3 * BULK_MIN) if not i % 2]
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in calls] == [[[7], 2]] + [
        [odd[i:i + 3], 2] for i in range(0, len(odd), 3)]
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in validations] == [
        [even[i:i + 3], 2] for i in range(0, len(even), 3)]
    # And a bulk message equals the send_task one field for field, except the per-message ones
    reference, bulk = _flatten(calls[0]), _flatten(calls[1])
    assert reference.keys() == bulk.keys()
    assert {k: v for k, v in reference.items() if k not in PER_MESSAGE} == {
        k: v for k, v in bulk.items() if k not in PER_MESSAGE}
    assert bulk["headers", "id"] == bulk["headers", "root_id"] == bulk["properties", "correlation_id"]
    assert bulk["headers", "argsrepr"] == "[[101, 103, 105], 2]"
    assert validations[0]["headers"]["task"] == "cascade.validate"
    assert len({m["headers"]["id"] for m in calls + validations}) == BULK_MIN + 1


def test_worker_runs_a_bulk_published_batch(env, sim, workers):
    # Given a worker and a batch large enough that the producer publishes it in bulk
    sim_cfg = scenario.sim_config()
    server = sim(sim_cfg)
    client = _client(env, server.url)
    rows = scenario.rows(3 * BULK_MIN, "label")
    workers(concurrency=16)
    # When it is submitted
    result = client.submit("label", rows, key_field="id")
    # Then every job runs to the end the sim predicts
    assert client.wait(result.batch_id, timeout=60, poll_s=0.2).is_done
    _audit(env, client, result.batch_id, client.config.snapshot("label"), sim_cfg, rows)


@pytest.mark.slow
def test_every_benchmark_runs_on_a_tiny_size(env, tmp_path):
    # Given the test's services
    out = tmp_path / "rows.json"
    environ = env.environ(CASCADE_BENCH_DATABASE_URL=env.services.database_url,
                          CASCADE_BENCH_BROKER_URL=env.services.broker_url)
    # When `python -m bench --tiny` runs
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--json", str(out)], env=environ, cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=240)
    # Then every benchmark produced its rows and none crashed
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    names = {r["benchmark"].split(" ")[0] for r in rows}
    assert names == {"1", "2", "3", "4", "5", "6", "7"}, rows
    assert not [r for r in rows if "crashed" in r["benchmark"]]
    assert all(r["cascade"] is not None for r in rows)
    stats = next(r for r in rows if r["benchmark"].startswith("5 stats: escalation_stats"))
    assert "identical" in stats["note"], stats


def test_benchmark_leaves_no_keys_or_schemas(env):
    # Given a shared Redis and Postgres (the benchmark's scratch cleans up after itself)
    from bench.harness import Services, scratch

    svc = Services(env.services.database_url, env.services.broker_url, embedded=False)
    # When a scratch area is used and left
    with scratch(svc, "smoke", migrate=False) as box:
        client = box.redis()
        client.set(box.prefix + "x", 1)
        client.close()
        schema, prefix = box.schema, box.prefix
    # Then its keys and its schema are gone
    client = env_redis(env)
    try:
        assert not list(client.scan_iter(match=prefix + "*"))
    finally:
        client.close()
    assert env.scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s", s=schema) == 0
