"""A model's rate_limit_rpm holds across worker processes (one Redis bucket per model), and calls above it
wait — inline for a short while, in Postgres beyond that — instead of failing."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from cascade.client import Client
from cascade.publish import CeleryPublisher
from cascade.ratelimit import RedisRateLimiter, burst_of
from cascade.sim import SimConfig, SimModel
from tests.conftest import BROKERS
from tests.integration import scenario
from tests.integration.test_provider_faults import sweeping

pytestmark = pytest.mark.integration


@pytest.fixture
def limiter(services):
    limiter = RedisRateLimiter.from_broker(services.broker_url, key_prefix=f"{uuid.uuid4().hex[:10]}:")
    yield limiter
    limiter.close()


def test_bucket_allows_a_burst_then_spaces_requests(limiter):
    # Given a model at 600 rpm: a burst of 10, then one request every 0.1 s
    # When 14 requests reserve a slot at once
    slots = [limiter.reserve("m", 600, count=1, max_wait_s=5, hold=None) for _ in range(14)]
    # Then all are granted: the burst at once, the rest 0.1 s apart
    assert all(s.granted for s in slots)
    waits = [s.wait_s(0) for s in slots]
    assert waits[:10] == [0.0] * 10
    for k, wait in enumerate(waits[10:], start=1):
        assert k * 0.1 - 0.05 <= wait <= k * 0.1 + 1e-6
    # And several slots at once come back spaced the same way
    many = limiter.reserve("m", 600, count=3, max_wait_s=5, hold=None)
    assert many.granted
    assert many.wait_s(2) - many.wait_s(0) == pytest.approx(0.2)


def test_denied_without_hold_books_nothing(limiter):
    # Given a model at 60 rpm whose one-request burst is used
    assert limiter.reserve("m", 60, count=1, max_wait_s=0.5, hold=None).wait_s(0) == 0
    # When two more requests may wait 0.5 s at most
    first = limiter.reserve("m", 60, count=1, max_wait_s=0.5, hold=None)
    second = limiter.reserve("m", 60, count=1, max_wait_s=0.5, hold=None)
    # Then both are denied, with the same next slot about 1 s away: a denial books nothing
    assert not first.granted and not second.granted
    assert first.first_s == pytest.approx(second.first_s, abs=0.05)
    assert 0.9 <= first.first_s <= 1.0


def test_a_held_slot_is_kept_for_its_job(limiter):
    # Given a model at 60 rpm whose burst is used
    limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold=None)
    # When two jobs are denied with a hold
    one = limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold="1:1")
    two = limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold="2:1")
    # Then both are denied, and each gets its own slot, 1 s apart
    assert not one.granted and not two.granted
    assert two.first_s - one.first_s == pytest.approx(1.0, abs=0.05)
    # And a job back too early is still denied, its slot kept; back in time, it gets exactly that slot
    assert not limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold="1:1").granted
    time.sleep(one.first_s - 0.15)
    again = limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold="1:1")
    assert again.granted and 0 < again.wait_s(0) <= 0.2
    # And a job that missed its slot is held a new one, at the end of the queue
    time.sleep(two.first_s - one.first_s + 0.3)
    late = limiter.reserve("m", 60, count=1, max_wait_s=0.2, hold="2:1")
    assert not late.granted and 0.6 <= late.first_s <= 0.9


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_rate_limit_holds_across_two_workers(env, sim, workers):
    # Given a model limited to 120 rpm (2/s, burst 2), a 0-latency sim and two worker processes (on RabbitMQ the
    # limit lives in CASCADE_REDIS_URL's Redis)
    rpm, rows = 120, scenario.rows(30, "summary")
    server = sim(SimConfig(seed=3))
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=scenario.cascade_config(server.url, rate_limit_rpm=rpm),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    procs = [workers(concurrency=16), workers(concurrency=16)]
    # When 30 single-sample jobs are submitted at once (with a sweeper for the ones waiting in Postgres)
    with sweeping(env) as swept:
        batch = client.submit("summary", rows, key_field="id").batch_id
        state = client.wait(batch, timeout=60, poll_s=0.2)
    # Then every job succeeded on its first tier, with one request each: none failed for the limit
    assert state.counts == {"succeeded": 30} and state.by_tier == {1: 30}, state
    assert env.scalar("SELECT count(*) FROM attempts WHERE error IS NOT NULL") == 0
    assert httpx.get(server.url.removesuffix("/v1") + "/stats").json()["requests"] == 30
    # And in no window did requests exceed burst + rate × window (0.2 s slack for scheduling)
    sent = [r[0] for r in env.rows("SELECT extract(epoch FROM created_at) FROM attempts ORDER BY 1")]
    rate, burst = rpm / 60, burst_of(rpm)
    for i in range(len(sent)):
        for j in range(i + 1, len(sent)):
            assert j - i + 1 <= burst + rate * (float(sent[j] - sent[i]) + 0.2), (i, j, sent[i], sent[j])
    assert float(sent[-1] - sent[0]) >= (30 - burst) / rate - 0.5
    # And long waits went through Postgres instead of holding a worker slot
    assert swept["due"] > 0
    for proc in procs:
        assert proc.proc.poll() is None
        assert "Traceback" not in proc.log.read_text(errors="replace")
    client.close()


def test_token_limit_holds_across_two_workers(env, sim, workers):
    # Given a sim that enforces 6,000 tokens a minute (and 600 requests) for the small model per fixed 10 s
    # window (1,000 tokens each), a cascade config 5% under those limits (as one configures a provider's: its
    # windows and ours never line up exactly), and two worker processes
    tpm, rpm, rows = 5700, 570, scenario.rows(60, "summary")
    limits = SimModel(latency_ms=20, rpm_limit=600, tpm_limit=6000, limit_window_s=10)
    server = sim(SimConfig(seed=3, models={"small": limits}, unknown_models="default"))
    settings = env.settings()
    config = scenario.cascade_config(server.url, rate_limit_rpm=rpm, rate_limit_tpm=tpm)
    client = Client(settings, engine=env.engine, config=config,
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    procs = [workers(concurrency=16), workers(concurrency=16)]
    # When 60 single-sample jobs (about 23 tokens each, 600 reserved: max_tokens 512) are submitted at once
    with sweeping(env) as swept:
        batch = client.submit("summary", rows, key_field="id").batch_id
        state = client.wait(batch, timeout=90, poll_s=0.2)
    # Then every job succeeded on its first tier, and the sim answered no request with a 429
    assert state.counts == {"succeeded": 60} and state.by_tier == {1: 60}, state
    assert [s.status for s in server.seen()] == [200] * 60
    # And the tokens took more than one of the sim's windows (so its limit held), and waits went through Postgres
    used = env.rows("SELECT extract(epoch FROM created_at), input_tokens + output_tokens FROM attempts ORDER BY 1")
    assert sum(u for _, u in used) > 6000 * 10 / 60
    assert swept["due"] > 0
    for proc in procs:
        assert proc.proc.poll() is None
        assert "Traceback" not in proc.log.read_text(errors="replace")
    client.close()
