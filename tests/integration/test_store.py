"""cascade.store against a real Postgres: the database errors it translates into cascade's own."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import yaml
from sqlalchemy.exc import IntegrityError

from cascade import producer, store
from cascade.config import parse_config
from cascade.errors import CascadeError, DuplicateKey, IdempotencyConflict, IdempotencyKeyTaken, InputError

pytestmark = pytest.mark.integration

CONFIG = """\
models:
  - {name: small, base_url: "http://sim.invalid", model: sim-small}
task_types:
  - name: classify
    prompt: "Ticket {id}: {text}"
    tiers: [small]
"""


def _batch(batch_id: str, key: str | None) -> store.NewBatch:
    return store.NewBatch(batch_id, "classify", key, "{}", "h", "<test>", 1, Decimal(0), Decimal(0))


def test_a_taken_idempotency_key_is_translated(env):
    # Given a batch holding an idempotency key
    with env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b1", "nightly"))
    # When another batch is inserted under the same key
    with pytest.raises(IdempotencyKeyTaken) as caught, env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b2", "nightly"))
    # Then the cascade error names the key and keeps the database error as its cause
    assert caught.value.key == "nightly"
    assert isinstance(caught.value.__cause__, IntegrityError)


def test_other_integrity_errors_are_not_taken_keys(env):
    # Given a batch without an idempotency key
    with env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b1", None))
    # When a batch with the same id is inserted, then the database error is not mistaken for a taken key
    with pytest.raises(IntegrityError), env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b1", "other"))


def test_a_duplicate_row_key_is_translated(env):
    # Given a batch row
    with pytest.raises(DuplicateKey) as caught, env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b1", None))
        # When its jobs are copied and the third repeats the first one's key
        store.copy_jobs(conn, "b1", "classify", [("a", "{}", 1, None), ("b", "{}", 1, None), ("a", "{}", 1, None)])
    # Then the error names the key and the row (an InputError: the input is at fault)
    assert (caught.value.key, caught.value.row) == ("a", 3)
    assert isinstance(caught.value, InputError)
    assert env.scalar("SELECT count(*) FROM batches") == 0


def _blocked_on_insert(env) -> bool:
    # make_engine names each test schema's connections: another run's submits do not count
    return bool(env.scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                           "AND application_name = 'cascade:' || current_schema() "
                           "AND query LIKE '%INSERT INTO batches%'"))


@pytest.mark.parametrize("same_rows", [True, False])
def test_a_concurrent_twin_with_the_same_key(env, same_rows):
    # Given a submit whose transaction holds an idempotency key, not yet committed
    snap = parse_config(yaml.safe_load(CONFIG), "cascade.yaml").snapshot("classify")
    rows = [{"id": i, "text": f"ticket {i}"} for i in range(1, 4)]
    twin = list(enumerate(rows if same_rows else rows[:2], start=1))
    accepted = producer._Accepted(list(enumerate(rows, start=1)), snap, "<rows>", "id", producer._Rejects(None))
    count = sum(1 for _ in accepted)
    outcome: list[object] = []
    with env.engine.connect() as first:
        store.insert_batch(first, _batch("first", "nightly"))
        store.finish_batch(first, "first", count, accepted.digest.hexdigest())
        # When a second submit with the same key passes the up-front check and blocks on its INSERT
        def second() -> None:
            try:
                outcome.append(producer.submit_rows(env.engine, None, snap, twin, key_field="id",
                                                    idempotency_key="nightly"))
            except CascadeError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 10
        while not _blocked_on_insert(env):
            assert time.monotonic() < deadline, "the second submit never waited on the first one's key"
            time.sleep(0.05)
        # And the first one commits
        first.commit()
        thread.join(10)
    # Then the second submit answers as for a key it found up front: the same batch, or a conflict
    if same_rows:
        assert isinstance(outcome[0], producer.SubmitResult)
        assert (outcome[0].batch_id, outcome[0].created) == ("first", False)
    else:
        assert isinstance(outcome[0], IdempotencyConflict)
        assert outcome[0].batch_id == "first"
    assert env.scalar("SELECT count(*) FROM batches") == 1


def test_an_answer_with_fewer_choices_than_n_covers_only_what_came_back(env):
    # Given a claimed job whose n=3 request came back with one choice (a backend that ignores n)
    with env.engine.begin() as conn:
        store.insert_batch(conn, _batch("b1", None))
        store.copy_jobs(conn, "b1", "classify", [("k1", '{"id": 1, "text": "t"}', 1, None)])
        job_id = conn.exec_driver_sql("SELECT id FROM jobs").scalar_one()
        (claim,) = store.claim(conn, [job_id], 1, store.Stage.CALL, 300)
        (attempt,) = store.start_attempts(conn, [store.NewAttempt(job_id, 1, "small", None, 0, 3)])
        store.end_attempts(conn, [{"id": attempt, "latency_ms": 5, "input_tokens": 10, "output_tokens": 3,
                                   "cost_usd": Decimal(0), "error": None, "detail": None, "response": '["a"]',
                                   "choices": 1}])
    # When the job's history is read for its next claim
    with env.engine.begin() as conn:
        history = store.prepare_attempts(conn, [claim], 1)[job_id]
    # Then only sample 0 is answered: samples 1 and 2 are still to be asked for
    assert history.answered == frozenset({0})
