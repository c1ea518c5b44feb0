"""The request cache end to end: reruns pay nothing, duplicates pay once, single flight across workers."""

from __future__ import annotations

import json
import threading
from decimal import Decimal

import pytest

from cascade.client import Client
from cascade.publish import CeleryPublisher
from cascade.sim import SimConfig, SimModel
from cascade.store.cache import Fill, Wanted, claim_keys, fill_keys
from tests.integration import scenario
from tests.integration.audit import audit as _audit
from tests.integration.inprocess import Run
from tests.integration.test_cli import _cli, _config_file

pytestmark = pytest.mark.integration


def _client(env, sim_url, config=None, **settings):
    s = env.settings(**settings)
    return Client(s, engine=env.engine, config=config or scenario.cascade_config(sim_url),
                  publisher=CeleryPublisher.connect(s, s.broker_url))


def _run(client, task, rows, **kw):
    batch_id = client.submit(task, rows, **kw).batch_id
    assert client.wait(batch_id, timeout=90, poll_s=0.1).is_done
    return batch_id


def _results(client, batch_id):
    return {r["key"]: (r["status"], r["tier"], r["output"]) for r in client.results(batch_id)}


def _attempts(env, batch_id):
    """Per (row key, tier, sample): (response, cached, cost, saved)."""
    rows = env.rows("""SELECT j.key, a.tier, a.sample, a.response, a.cached, a.cost_usd, a.saved_usd, a.input_tokens,
                              a.output_tokens
                       FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b AND a.error IS NULL""",
                    b=batch_id)
    return {(r.key, r.tier, r.sample): r for r in rows}


def _cost(env, batch_id):
    return env.scalar("SELECT sum(cost_usd) FROM jobs WHERE batch_id = :b", b=batch_id)


def test_a_rerun_is_answered_from_the_cache(env, sim, workers):
    # Given a three-tier cascade whose sim escalates some rows, and a batch run once
    sim_cfg = scenario.sim_config(seed=5)
    server = sim(sim_cfg)
    client = _client(env, server.url)
    workers(concurrency=16)
    rows = scenario.rows(40, "label")
    first = _run(client, "label", rows, key_field="id")
    paid = len(server.seen())
    assert paid > 0

    # When the same rows are submitted again under another idempotency key
    second = _run(client, "label", rows, key_field="id", idempotency_key="rerun")

    # Then no request reaches the sim, and outputs, tiers and statuses are identical (and as the sim predicts)
    assert second != first
    assert len(server.seen()) == paid
    assert _results(client, second) == _results(client, first)
    _audit(env, client, second, client.config.snapshot("label"), sim_cfg, rows)
    # And the rerun costs nothing: every attempt is a cached one with the original tokens and saved cost
    assert _cost(env, second) == 0 < _cost(env, first)
    before, after = _attempts(env, first), _attempts(env, second)
    assert before.keys() == after.keys()
    for key, hit in after.items():
        original = before[key]
        assert hit.cached and not original.cached
        assert (hit.response, hit.input_tokens, hit.output_tokens) == (original.response, original.input_tokens,
                                                                       original.output_tokens)
        assert hit.cost_usd == 0 and hit.saved_usd == original.cost_usd
    # And the views: escalation_stats counts the cached jobs as jobs, cache_stats counts the hits
    stats = {r["task_type"]: r for r in client.stats()}
    assert stats["label"]["jobs"] == 80
    cache = env.rows("SELECT * FROM cache_stats")
    assert [(r.task_type, r.hits, r.misses) for r in cache] == [("label", len(after), len(before))]
    assert cache[0].hit_rate == Decimal("0.5000") and cache[0].saved_usd == _cost(env, first)


def test_a_row_twice_pays_once_and_no_cache_pays_again(env, sim, workers):
    # Given a batch whose every row appears twice (the same prompt)
    server = sim(scenario.sim_config(seed=8))
    client = _client(env, server.url)
    workers(concurrency=16)
    rows = scenario.rows(25, "summary")
    doubled = _run(client, "summary", rows + rows)
    twice = len(server.seen())

    # When the unique rows are submitted with cache=False (--no-cache)
    again = _run(client, "summary", rows, key_field="id", cache=False)

    # Then the doubled batch made exactly the requests of the unique rows, and --no-cache made them all again
    assert len(server.seen()) - twice == twice > 0
    assert env.scalar("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id "
                      "WHERE j.batch_id = :b AND a.cached", b=again) == 0
    # And both copies of a row got the same answer
    out = [r["output"] for r in sorted(client.results(doubled), key=lambda r: int(r["key"]))]
    assert out[:25] == out[25:]
    assert sorted(r["output"] for r in client.results(again)) == sorted(out[:25])


def test_cache_false_on_a_model_sends_every_request(env, sim, workers):
    # Given models configured with cache: false
    server = sim(scenario.sim_config(seed=8))
    client = _client(env, server.url, config=scenario.cascade_config(server.url, cache=False))
    workers(concurrency=16)
    rows = scenario.rows(10, "summary")
    _run(client, "summary", rows, key_field="id")
    once = len(server.seen())
    # When the rows are submitted again
    _run(client, "summary", rows, key_field="id", idempotency_key="again")
    # Then every request went out again and nothing was stored
    assert len(server.seen()) == 2 * once
    assert env.scalar("SELECT count(*) FROM request_cache") == 0


def test_one_sample_requests_stay_distinct_samples(env, sim, workers):
    # Given a model without n support: 3 samples are 3 one-sample requests
    sim_cfg = scenario.sim_config(seed=3)
    server = sim(sim_cfg)
    client = _client(env, server.url, config=scenario.cascade_config(server.url, supports_n=False))
    workers(concurrency=16)
    rows = scenario.rows(20, "label")
    first = _run(client, "label", rows, key_field="id")
    paid = len(server.seen())
    assert all(r.n == 1 for r in server.seen())

    # When the batch is rerun from the cache
    second = _run(client, "label", rows, key_field="id", idempotency_key="rerun")

    # Then no request went out, and each job has 3 samples per tier, each the one its own request got
    assert len(server.seen()) == paid
    before, after = _attempts(env, first), _attempts(env, second)
    assert before.keys() == after.keys()
    assert {k: r.response for k, r in after.items()} == {k: r.response for k, r in before.items()}
    samples_per_tier = {}
    for key, tier, sample in after:
        samples_per_tier.setdefault((key, tier), set()).add(sample)
    assert {len(s) for (_, tier), s in samples_per_tier.items() if tier < 3} == {3}
    # (the samples really differ: some tier-1 votes disagree, so the cache did not repeat one answer)
    assert any(len({json.dumps(after[(k, 1, s)].response) for s in range(3)}) > 1 for k in {k for k, _, _ in after})
    # And the votes are the same
    votes = "SELECT j.key, v.tier, v.votes, v.agreement, v.passed FROM validations v JOIN jobs j ON j.id = v.job_id " \
            "WHERE j.batch_id = :b ORDER BY 1, 2"
    assert [tuple(r) for r in env.rows(votes, b=second)] == [tuple(r) for r in env.rows(votes, b=first)]
    assert _results(client, second) == _results(client, first)


def test_single_flight_across_two_worker_processes(env, sim, workers):
    # Given two worker processes, one job per message, and a slow model
    server = sim(SimConfig(models={"small": SimModel(latency_ms=300)}))
    client = _client(env, server.url, jobs_per_message=1)
    workers(concurrency=32)
    workers(concurrency=32)
    # When 10 prompts come 12 times each, interleaved
    prompts = scenario.rows(10, "label")
    rows = [dict(p) for _ in range(12) for p in prompts]
    batch_id = _run(client, "label", rows)

    # Then each prompt was sent once (n=3 at tier 1) and every job got its prompt's answer
    assert len(server.seen()) == 10
    results = list(client.results(batch_id))
    assert all(r["status"] == "succeeded" and r["tier"] == 1 for r in results)
    by_prompt = {}
    for row, r in zip(rows, sorted(results, key=lambda r: int(r["key"])), strict=True):
        by_prompt.setdefault(row["id"], set()).add(json.dumps(r["output"], sort_keys=True))
    assert all(len(outputs) == 1 for outputs in by_prompt.values())
    assert env.scalar("SELECT hits FROM cache_stats") == 110
    # And the workers' requests overlapped: some jobs waited for another's flight rather than reading a stored answer
    assert env.scalar("SELECT count(*) FROM attempts WHERE cached AND latency_ms > 0") > 0


def test_an_undecodable_entry_is_a_miss(env, sim, workers):
    # Given a batch run once, and its cache rows then damaged
    server = sim(scenario.sim_config(seed=2))
    client = _client(env, server.url)
    worker = workers(concurrency=16)
    rows = scenario.rows(10, "summary")
    first = _run(client, "summary", rows, key_field="id")
    paid = len(server.seen())
    entries = env.scalar("SELECT count(*) FROM request_cache")
    with env.engine.begin() as conn:
        conn.exec_driver_sql("""UPDATE request_cache SET answer = '{"contents": 7}'""")

    # When the rows are submitted again
    second = _run(client, "summary", rows, key_field="id", idempotency_key="again")

    # Then every damaged entry was a miss (sent again, same answers), logged once per entry, and rewritten
    assert len(server.seen()) == 2 * paid
    assert _results(client, second) == _results(client, first)
    log = worker.log.read_text()
    assert log.count("cannot be decoded") == entries
    third = _run(client, "summary", rows, key_field="id", idempotency_key="third")
    assert len(server.seen()) == 2 * paid
    assert _results(client, third) == _results(client, first)


def _wanted(i):
    return Wanted(bytes([i]) * 32, "http://x/v1", "m", 1, 0)


def _fill(i, text):
    return Fill(_wanted(i), {"contents": [text], "finish_reasons": ["stop"]}, 10, 2, 0, 0, None,
                Decimal("0.001"))


def test_concurrent_claims_and_writers_leave_one_row_and_one_sender(env):
    # Given many sessions claiming the same keys at once
    start = threading.Barrier(8)
    mine = []

    def claim(n):
        start.wait()
        with env.engine.begin() as conn:
            got = claim_keys(conn, [_wanted(1), _wanted(2)], flight=f"f{n}", worker=None, ttl_s=None, lease_s=300,
                             dead_s=15)
        mine.extend(k for k, row in got.items() if row.mine)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then each key has exactly one sender
    assert sorted(mine) == [_wanted(1).key, _wanted(2).key]

    # When many writers store answers to one key at once
    def fill(n):
        start.wait()
        with env.engine.begin() as conn:
            fill_keys(conn, [_fill(1, f"answer {n}"), _fill(2, "same")])

    threads = [threading.Thread(target=fill, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then one row per key holds one of the answers, and its flight is over
    rows = env.rows("SELECT key, answer, flight FROM request_cache ORDER BY key")
    assert len(rows) == 2 and all(r.flight is None for r in rows)
    assert rows[0].answer["contents"][0].startswith("answer ")
    # And a later claim reads it as a hit
    with env.engine.begin() as conn:
        got = claim_keys(conn, [_wanted(1)], flight="late", worker=None, ttl_s=None, lease_s=300, dead_s=15)
    assert not got[_wanted(1).key].mine and got[_wanted(1).key].answer == rows[0].answer


def test_expired_and_abandoned_entries_are_taken_over(env):
    # Given an answer an hour old and a flight whose claim stopped long ago
    with env.engine.begin() as conn:
        fill_keys(conn, [_fill(1, "old")])
        claim_keys(conn, [_wanted(2)], flight="gone", worker=None, ttl_s=None, lease_s=300, dead_s=15)
        conn.exec_driver_sql("UPDATE request_cache SET answered_at = now() - interval '1 hour', "
                             "flight_at = now() - interval '1 hour' WHERE flight IS NOT NULL OR answer IS NOT NULL")
    # When they are claimed with a TTL of a minute and a lease of ten
    with env.engine.begin() as conn:
        kept = claim_keys(conn, [_wanted(1)], flight="new", worker=None, ttl_s=None, lease_s=600, dead_s=15)
        got = claim_keys(conn, [_wanted(1), _wanted(2)], flight="new", worker=None, ttl_s=60, lease_s=600, dead_s=15)
    # Then without a TTL the old answer is a hit; with one both keys are this claim's to send
    assert not kept[_wanted(1).key].mine
    assert all(row.mine for row in got.values())


def test_the_cli_bypasses_shows_and_prunes_the_cache(env, sim, workers, tmp_path):
    # Given a config file, a worker and a batch run once from the CLI
    server = sim(scenario.sim_config(seed=4))
    config = _config_file(tmp_path, server.url)
    workers(concurrency=16)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(6, "summary"))
    first = _cli(env, config, "submit", "summary", "-", "--key-field", "id", stdin=rows).stdout.strip()
    assert _cli(env, config, "wait", first, "--timeout", "60").returncode == 0
    paid = len(server.seen())

    # When the rows are submitted again, then once more with --no-cache
    again = _cli(env, config, "submit", "summary", "-", "--key-field", "id", "--idempotency-key", "2", stdin=rows)
    assert _cli(env, config, "wait", again.stdout.strip(), "--timeout", "60").returncode == 0
    fresh = _cli(env, config, "submit", "summary", "-", "--key-field", "id", "--no-cache", stdin=rows)
    assert fresh.returncode == 0, fresh.stderr
    assert _cli(env, config, "wait", fresh.stdout.strip(), "--timeout", "60").returncode == 0

    # Then the rerun made no request and status says its requests were hits; --no-cache paid them all again
    assert len(server.seen()) == 2 * paid
    shown = _cli(env, config, "status", again.stdout.strip())
    assert f"cache: {paid} of {paid} answered requests were hits, saving $" in shown.stdout, shown.stdout
    status = json.loads(_cli(env, config, "status", again.stdout.strip(), "--json").stdout)
    assert status["cache"]["hits"] == paid and status["cache"]["misses"] == 0
    assert json.loads(_cli(env, config, "status", fresh.stdout.strip(), "--json").stdout)["cache"]["hits"] == 0

    # And prune needs an age: none given and no TTL is exit 2, naming the setting
    entries = env.scalar("SELECT count(*) FROM request_cache")
    bare = _cli(env, config, "cache", "prune")
    assert bare.returncode == 2 and "CASCADE_CACHE_TTL_S" in bare.stderr
    assert _cli(env, config, "cache", "prune", "--help").returncode == 0
    # An age keeps younger entries; --all deletes every one
    kept = _cli(env, config, "cache", "prune", "--older-than", "1")
    assert kept.returncode == 0 and "deleted 0 request cache entries" in kept.stderr
    assert env.scalar("SELECT count(*) FROM request_cache") == entries > 0
    gone = _cli(env, config, "cache", "prune", "--all")
    assert gone.returncode == 0 and f"deleted {entries} request cache entries" in gone.stderr, gone.stderr
    assert env.scalar("SELECT count(*) FROM request_cache") == 0



def test_identical_requests_in_one_message_are_sent_once(env, sim):
    # Given a message of 16 jobs holding 8 prompts twice each, side by side
    server = sim(scenario.sim_config(seed=9))
    r = Run(env, scenario.cascade_config(server.url))
    try:
        rows = [row for row in scenario.rows(8, "summary") for _ in range(2)]
        batch = r.client.submit("summary", rows).batch_id
        # When its stages run in this process
        r.drive(batch)
    finally:
        r.close()
    # Then each tier's request for a prompt went out once, and its twin took the answer as a hit
    sent = env.rows("""SELECT j.key::int AS line, a.tier, a.cached, a.response FROM attempts a
                       JOIN jobs j ON j.id = a.job_id ORDER BY 1, 2""")
    assert len(server.seen()) == sum(not a.cached for a in sent) == sum(a.cached for a in sent) > 0
    by_line = {(a.line, a.tier): a for a in sent}
    for (line, tier), a in by_line.items():
        if line % 2 == 0:  # the second copy of line - 1
            twin = by_line[(line - 1, tier)]
            assert a.cached and not twin.cached and a.response == twin.response


def test_errors_refusals_and_cut_off_answers_are_never_stored(env, sim):
    # Given tier 1 answering only cut-off choices (finish_reason length) and tier 2 refusing every sample
    base = scenario.sim_config(seed=6)
    models = {**base.models, "small": base.model("small").model_copy(update={"p_truncated": 1.0}),
              "medium": base.model("medium").model_copy(update={"p_refusal": 1.0})}
    server = sim(base.model_copy(update={"models": models}))
    r = Run(env, scenario.cascade_config(server.url, max_retries=0))
    rows = scenario.rows(6, "summary")
    try:
        first = r.submit(rows, task="summary")
        r.drive(first)
        paid = len(server.seen())
        # When the rows run again
        second = r.client.submit("summary", rows, key_field="id", idempotency_key="again").batch_id
        r.drive(second)
    finally:
        r.close()
    # Then only tier 3's answers were stored and reused; tiers 1 and 2 were asked again
    assert {m for (m,) in env.rows("SELECT DISTINCT model FROM request_cache WHERE answer IS NOT NULL")} == {"sim-large"}
    tiers = env.rows("""SELECT a.tier, bool_and(a.cached) AS all_cached, bool_or(a.cached) AS any_cached
                        FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b GROUP BY 1 ORDER BY 1""",
                     b=second)
    assert [(t.tier, t.all_cached, t.any_cached) for t in tiers] == [(1, False, False), (2, False, False), (3, True, True)]
    assert len(server.seen()) == paid + sum(1 for s in server.seen()[:paid] if s.model != "large")
    assert _results(r.client, second) == _results(r.client, first)
