"""Unit tests for cascade.ratelimit: broker URL → redis-py URL, burst size, slot waits, failing open."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from cascade.providers import RateLimits
from cascade.ratelimit import UNLIMITED, RedisRateLimiter, Reservation, burst_of, pause_s, redis_url, upper_bound_tokens


@pytest.mark.parametrize(
    ("broker_url", "expected"),
    [
        ("redis+socket:///d/redis/redis.sock", "unix:///d/redis/redis.sock?db=0"),
        ("redis+socket:///d/redis/redis.sock?virtual_host=3", "unix:///d/redis/redis.sock?db=3"),
        ("redis+socket:///tmp/a%20b/redis.sock?virtual_host=2", "unix:///tmp/a%20b/redis.sock?db=2"),
        ("redis+socket://:secret@/d/redis.sock", "unix://:secret@/d/redis.sock?db=0"),
        ("socket:///d/redis.sock?virtual_host=1", "unix:///d/redis.sock?db=1"),
        ("redis://localhost:6379", "redis://localhost:6379/0"),
        ("redis://localhost:6379/", "redis://localhost:6379/0"),
        ("redis://:pw@redis:6379/4", "redis://:pw@redis:6379/4"),
        ("redis://redis:6379?virtual_host=5", "redis://redis:6379/5"),
        ("rediss://redis:6380/1?ssl_cert_reqs=required", "rediss://redis:6380/1?ssl_cert_reqs=required"),
        ("redis://redis:6379/2?visibility_timeout=3600", "redis://redis:6379/2"),  # kombu's option is dropped
    ],
)
def test_redis_url(broker_url: str, expected: str) -> None:
    # Given a kombu broker URL
    # When it is converted for redis-py
    # Then it names the same server and database, and redis-py accepts it
    assert redis_url(broker_url) == expected
    redis.Redis.from_url(expected).close()


def test_redis_url_rejects_other_brokers() -> None:
    with pytest.raises(ValueError, match="amqp"):
        redis_url("amqp://guest@rabbit//")


@pytest.mark.parametrize(("rpm", "burst"), [(1, 1), (60, 1), (61, 2), (120, 2), (3000, 50)])
def test_burst_is_one_second_of_traffic(rpm: int, burst: int) -> None:
    assert burst_of(rpm) == burst


def test_reservation_waits_are_spaced_and_never_negative() -> None:
    # Given a reservation whose first slot is in the burst (0.25 s ago) and then every 0.5 s
    slots = Reservation(True, -0.25, 0.5)
    # Then the requests wait 0, 0.25, 0.75 s
    assert [slots.wait_s(i) for i in range(3)] == [0.0, 0.25, 0.75]
    assert UNLIMITED.granted and UNLIMITED.wait_s(7) == 0.0


def test_unreachable_redis_fails_open(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    # Given a limiter whose Redis does not exist
    limiter = RedisRateLimiter.from_broker(f"redis+socket://{tmp_path}/missing.sock")
    # When a slot is reserved
    with caplog.at_level(logging.WARNING, logger="cascade.ratelimit"):
        slots = limiter.reserve("small", 60, count=1, max_wait_s=1.0, hold=None)
    # Then the request may go (the provider's own 429s still bound it), with a warning naming the model
    assert slots == UNLIMITED
    assert "'small'" in caplog.text
    limiter.close()


# --- tokens (rate_limit_tpm) and settling, against a real Redis ------------------------------------------


@pytest.fixture
def limiter(own_redis):
    limiter = RedisRateLimiter.from_broker(own_redis.url, key_prefix="t:")
    yield limiter
    limiter.close()


def _tat_s(own_redis, model: str = "m") -> float:
    """Seconds from now until the token bucket's theoretical arrival time (≤ 0: the bucket is full)."""
    client = own_redis.client()
    try:
        tat = int(client.hget(f"t:cascade:ratelimit:{model}:tpm", "tat"))
        now_s, now_us = client.time()
    finally:
        client.close()
    return (tat - (now_s * 1_000_000 + now_us)) / 1_000_000


def test_upper_bound_counts_bytes_overheads_and_every_choice() -> None:
    # Given a system and a user message (one of them not ASCII)
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "é€"}]
    # Then the bound is their UTF-8 bytes (3 + 5), 4 per message, 3 per request and max_tokens × n
    assert upper_bound_tokens(messages, n=3, max_tokens=10) == 8 + 2 * 4 + 3 + 30


def test_a_request_never_reserves_less_than_the_sim_counts() -> None:
    # Given prompts of every shape, the sim's own count (its prompt_tokens) never exceeds the bound
    for text in ["", "a", "x" * 1001, "Ticket 7: printer on floor 3 is jammed", "日本語のテキスト" * 40]:
        messages = [{"role": "user", "content": text}]
        assert upper_bound_tokens(messages, n=1, max_tokens=0) >= 1 + len(text) // 4


def test_tokens_burst_one_second_then_wait(limiter, own_redis) -> None:
    # Given a model at 6,000 tpm (100 tokens/s, a burst of 100 tokens)
    # When a 60-token request and then a 90-token one reserve
    first = limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=60)
    second = limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=90)
    # Then the first goes at once, and the second when the bucket holds 90 tokens again: 0.5 s later
    assert first.granted and first.wait_s(0) == 0
    assert second.granted and second.wait_s(0) == pytest.approx(0.5, abs=0.02)
    # And the bucket is booked 1.5 s ahead (150 tokens)
    assert _tat_s(own_redis) == pytest.approx(1.5, abs=0.02)


def test_a_request_larger_than_the_burst_goes_when_the_bucket_is_empty(limiter) -> None:
    # Given 6,000 tpm (a burst of 100 tokens), when a request reserves 300 tokens on an idle bucket
    big = limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=300)
    # Then it goes at once (the burst is at least one request), and the next one waits for its tokens
    assert big.granted and big.wait_s(0) == 0
    after = limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=10)
    assert after.wait_s(0) == pytest.approx(3.0 - 0.9, abs=0.02)


def test_settle_returns_what_the_answer_did_not_use(limiter, own_redis) -> None:
    # Given two requests of 400 tokens at 6,000 tpm (the second waits 3 s)
    limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=400)
    assert limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=400).wait_s(0) > 2.9
    # When the first answer used 100 tokens
    limiter.settle("m", rpm=None, tpm=6000, reserved=400, used=100, pause_s=0)
    # Then 300 tokens (3 s) are back in the bucket: the next request waits 3 s less than it would have
    assert _tat_s(own_redis) == pytest.approx(5.0, abs=0.02)
    nxt = limiter.reserve("m", None, count=1, max_wait_s=10, hold=None, tpm=6000, tokens=100)
    assert nxt.wait_s(0) == pytest.approx(5.0 + 1.0 - 1.0, abs=0.02)
    # And an answer that used more than it reserved is charged the difference
    limiter.settle("m", rpm=None, tpm=6000, reserved=0, used=200, pause_s=0)
    assert _tat_s(own_redis) == pytest.approx(8.0, abs=0.02)


def test_settle_never_fills_the_bucket_beyond_its_burst(limiter, own_redis) -> None:
    # Given an idle bucket, when an answer gives back more than was ever booked
    limiter.settle("m", rpm=None, tpm=6000, reserved=5000, used=10, pause_s=0)
    # Then the bucket is merely full: one second of tokens goes at once, not 50
    assert _tat_s(own_redis) == pytest.approx(0.0, abs=0.02)
    assert limiter.reserve("m", None, count=1, max_wait_s=0.5, hold=None, tpm=6000, tokens=100).granted
    assert not limiter.reserve("m", None, count=1, max_wait_s=0.5, hold=None, tpm=6000, tokens=100).granted


def test_both_limits_the_later_slot_wins(limiter) -> None:
    # Given 60 rpm (burst 1) and 6,000 tpm, where the tokens are plenty
    one = limiter.reserve("m", 60, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=10)
    two = limiter.reserve("m", 60, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=10)
    # Then requests are spaced by the request limit
    assert one.wait_s(0) == 0 and two.wait_s(0) == pytest.approx(1.0, abs=0.02)
    # And a 700-token request takes the next request slot (2 s), booking its tokens from then on (7 s)
    three = limiter.reserve("m", 60, count=1, max_wait_s=10, hold=None, tpm=6000, tokens=700)
    assert three.wait_s(0) == pytest.approx(2.0, abs=0.02)
    # So the next request waits for the tokens, not for its request slot (3 s): 9 s less its 0.9 s of burst
    four = limiter.reserve("m", 60, count=1, max_wait_s=10, hold=None, tpm=6000, tokens=10)
    assert four.wait_s(0) == pytest.approx(8.1, abs=0.02)


def test_a_token_denial_without_a_settled_answer_books_nothing(limiter, own_redis) -> None:
    # Given a bucket booked 3 s ahead and no answer settled yet (the share of tokens used is unknown)
    limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=400)
    # When a job is denied with a hold
    denied = limiter.reserve("m", None, count=1, max_wait_s=0.5, hold="1:1", tpm=6000, tokens=400)
    # Then nothing is booked for it: it comes back soon and asks again
    assert not denied.granted
    assert _tat_s(own_redis) == pytest.approx(4.0, abs=0.02)


def test_a_held_job_books_its_expected_tokens_then_the_rest_when_it_comes_back(limiter, own_redis) -> None:
    # Given a model whose answers use a quarter of what they reserve (one answer settled), the bucket 3 s ahead
    limiter.settle("m", rpm=None, tpm=6000, reserved=400, used=100, pause_s=0)
    limiter.reserve("m", None, count=1, max_wait_s=5, hold=None, tpm=6000, tokens=400)
    # When a job of 400 tokens is denied with a hold
    held = limiter.reserve("m", None, count=1, max_wait_s=0.5, hold="1:1", tpm=6000, tokens=400)
    # Then its slot is when the bucket is free, and it booked 100 tokens (1 s), not 400
    assert not held.granted and held.first_s == pytest.approx(4.0, abs=0.02)
    assert _tat_s(own_redis) == pytest.approx(5.0, abs=0.02)
    # And back in time, it gets that slot and books the other 300 tokens, settled after its answer
    time.sleep(held.first_s - 0.4)
    again = limiter.reserve("m", None, count=1, max_wait_s=0.5, hold="1:1", tpm=6000, tokens=400)
    assert again.granted and 0 < again.wait_s(0) <= 0.5
    assert _tat_s(own_redis) == pytest.approx(0.4 + 1.0 + 3.0, abs=0.05)


def test_a_nearly_spent_provider_limit_pauses_every_slot(limiter, own_redis) -> None:
    # Given a model at 600 rpm and 60,000 tpm, idle
    # When an answer says a provider limit resets in 2 s
    limiter.settle("m", rpm=600, tpm=60000, reserved=50, used=50, pause_s=2.0)
    # Then the next slot of any process is after the reset, and this process holds back meanwhile
    slot = limiter.reserve("m", 600, count=1, max_wait_s=5, hold=None, tpm=60000, tokens=50)
    assert slot.granted and 2.0 <= slot.wait_s(0) <= 2.1
    assert 1.9 <= limiter.paused_s("m") <= 2.0 and limiter.paused_s("other") == 0


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        ({}, 0.0),  # no headers: never pause
        ({"limit_tokens": 1000, "remaining_tokens": 500, "reset_tokens_s": 9.0}, 0.0),
        ({"limit_tokens": 1000, "remaining_tokens": 30, "reset_tokens_s": 9.0}, 9.0),  # 3 % left
        ({"limit_requests": 100, "remaining_requests": 0, "reset_requests_s": 2.5}, 2.5),
        ({"remaining_requests": 0, "reset_requests_s": 2.5}, 2.5),  # no limit sent: spent means 0
        ({"remaining_requests": 3, "reset_requests_s": 2.5}, 0.0),
        ({"limit_requests": 100, "remaining_requests": 1, "reset_requests_s": 1.0, "limit_tokens": 1000,
          "remaining_tokens": 0, "reset_tokens_s": 4.0}, 4.0),  # both spent: the later reset
        ({"limit_tokens": 1000, "remaining_tokens": 0, "reset_tokens_s": 600.0}, 60.0),  # capped
        ({"limit_tokens": 1000, "remaining_tokens": 0}, 0.0),  # no reset: nothing to wait for
    ],
)
def test_pause_waits_for_the_reset_of_a_nearly_spent_limit(headers, pause: float) -> None:
    assert pause_s(RateLimits(**headers)) == pause


def test_unreachable_redis_fails_open_and_logs_once(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    # Given a limiter whose Redis does not exist
    limiter = RedisRateLimiter.from_broker(f"redis+socket://{tmp_path}/missing.sock")
    # When tokens are reserved and settled several times
    with caplog.at_level(logging.WARNING, logger="cascade.ratelimit"):
        slots = [limiter.reserve("m", None, count=1, max_wait_s=1.0, hold="1:1", tpm=600, tokens=50)
                 for _ in range(3)]
        limiter.settle("m", rpm=None, tpm=600, reserved=50, used=10, pause_s=1.0)
    # Then every request may go, the worker does not crash, one warning is logged, and the local pause holds
    assert slots == [UNLIMITED] * 3
    assert len(caplog.records) == 1
    assert limiter.paused_s("m") > 0.9
    limiter.close()
