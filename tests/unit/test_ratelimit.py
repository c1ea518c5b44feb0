"""Unit tests for cascade.ratelimit: broker URL → redis-py URL, burst size, slot waits, failing open."""

from __future__ import annotations

import logging

import pytest
import redis

from cascade.ratelimit import UNLIMITED, RedisRateLimiter, Reservation, burst_of, redis_url


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
