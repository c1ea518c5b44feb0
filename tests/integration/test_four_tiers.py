"""A four-tier cascade end to end: queues tier1..tier4, real `celery worker` processes and the sim over HTTP.

The workers get no cascade.yaml (as the other integration tests' workers: batches carry their config), so
they declare tier4 because `-Q` names it; the producer and the sweeper read the config file and declare
tier1..tier4 from it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from cascade.client import Client
from cascade.config import parse_config
from cascade.publish import BULK_MIN, CeleryPublisher, worker_queues
from cascade.sim import SimConfig, SimModel
from cascade.store import Stage
from tests.conftest import wait_for
from tests.integration import scenario
from tests.integration.audit import audit

pytestmark = pytest.mark.integration

MODELS = ("tiny", "small", "medium", "large")


def _config_data(sim_url: str) -> dict:
    models = [{"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10, "max_retries": 3,
               "price": {"input_per_mtok": str(k + 1), "output_per_mtok": str(2 * (k + 1))}}
              for k, name in enumerate(MODELS)]
    task = {"name": "summary", "prompt": "Summarize in one line: {text}", "output": "text",
            "length": {"min_chars": 3, "max_chars": 400}, "tiers": list(MODELS)}
    return {"models": models, "task_types": [task]}


def _sim_config() -> SimConfig:
    # Each of the first three tiers answers too short for most rows, so about a third of them reach tier 4,
    # which always answers.
    return SimConfig(seed=5, models={
        "tiny": SimModel(p_too_short=0.7), "small": SimModel(p_too_short=0.7),
        "medium": SimModel(p_too_short=0.7), "large": SimModel(p_too_short=0.0),
    })


@pytest.mark.slow
def test_jobs_escalate_to_a_fourth_tier_and_finish(env, sim, workers, sweeper, tmp_path):
    # Given a four-tier task type in cascade.yaml, a sim whose first three models mostly fail it,
    sim_cfg = _sim_config()
    server = sim(sim_cfg)
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(_config_data(server.url), sort_keys=False))
    config = parse_config(_config_data(server.url), str(path))
    settings = env.settings(config=path)
    # and two workers that consume every tier queue, including tier4 (and a sweeper that reads the config)
    queues = worker_queues(4)
    assert queues == ["tier1", "tier2", "tier3", "tier4", "validate", "audit"]
    procs = [workers(queues=queues, concurrency=16) for _ in range(2)]
    sweeper(CASCADE_CONFIG=str(path))
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    client = Client(settings, engine=env.engine, config=config, publisher=publisher)
    rows = scenario.rows(60, "summary")
    snap = config.snapshot("summary")
    predicted = Counter(scenario.predict(snap, sim_cfg, row)[:2] for row in rows)
    assert predicted[("succeeded", 4)] >= 10, predicted  # the sim's seed sends enough jobs to tier 4
    # When the batch is submitted and run
    result = client.submit("summary", rows, key_field="id")

    def finished() -> bool:
        exited = [w.log.read_text(errors="replace")[-3000:] for w in procs if w.proc.poll() is not None]
        assert not exited, f"a worker exited:\n{exited[0]}"
        return client.status(result.batch_id).is_done

    wait_for(finished, timeout=90, what="every job to finish")
    # Then every job is terminal and equals the sim's prediction, tier 4 included
    audit(env, client, result.batch_id, snap, sim_cfg, rows)
    assert env.scalar("SELECT count(*) FROM jobs WHERE status = 'succeeded' AND tier = 4") == predicted[
        ("succeeded", 4)]
    # And the views count the fourth tier: tier3_rate is "reached tier 3 or above"
    stats = {row["task_type"]: row for row in client.stats()}["summary"]
    finished = len(rows)
    reached = {t: sum(n for (_, tier), n in predicted.items() if tier >= t) for t in (2, 3)}
    assert (stats["jobs"], stats["finished"], stats["succeeded"]) == (60, 60, 60)
    assert float(stats["escalation_rate"]) == float(stats["tier2_rate"]) == pytest.approx(reached[2] / finished)
    assert float(stats["tier3_rate"]) == pytest.approx(reached[3] / finished)
    tiers = {(r.tier, r.model): r for r in env.rows("SELECT * FROM tier_stats WHERE task_type = 'summary'")}
    assert sorted(tiers) == [(k + 1, name) for k, name in enumerate(MODELS)]
    assert tiers[(4, "large")].pass_rate == 1
    assert tiers[(4, "large")].attempts == predicted[("succeeded", 4)]
    reasons = {(r.tier, r.reason): r.count for r in env.rows("SELECT * FROM escalation_reasons")}
    assert set(reasons) == {(1, "too_short"), (2, "too_short"), (3, "too_short")}
    assert reasons[(3, "too_short")] == predicted[("succeeded", 4)]


def test_a_producer_without_a_config_publishes_to_any_tier(env, tmp_path):
    # Given the publisher of a process that has no config file: it declares three tier queues
    settings = env.settings(config=tmp_path / "missing.yaml")
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    try:
        assert publisher.queue_lengths() == dict.fromkeys(worker_queues(3), 0)
        # When jobs fall due at tier 5 (one message, sent by send_task) and tier 6 (the bulk LPUSH path)
        publisher.publish([(1, 5, Stage.CALL)])
        publisher.publish([(i, 6, Stage.CALL) for i in range(BULK_MIN * settings.jobs_per_message)])
        # Then their messages wait on tier5 and tier6, which the queue lengths (the sweeper's) now cover
        lengths = publisher.queue_lengths()
    finally:
        publisher.close()
    assert lengths == {**dict.fromkeys(worker_queues(3), 0), "tier5": 1, "tier6": BULK_MIN}
    assert list(lengths) == ["tier1", "tier2", "tier3", "tier5", "tier6", "validate", "audit"]
