"""Secrets stay in the environment; the read-only role reads the views and nothing else; prompt templates
cannot reach Python attributes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cascade.client import Client
from cascade.config import ModelConfig, parse_config, render
from cascade.errors import ConfigError
from cascade.providers import ChatProvider, ProviderPool
from cascade.publish import CeleryPublisher
from cascade.sim import SimConfig, SimModel
from cascade.stages import StageContext, run_call
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

KEY_VAR = "CASCADE_SECURITY_TEST_KEY"  # env.environ() keeps CASCADE_* only when passed explicitly


def _config(url, *, key_var=KEY_VAR, broken_url=None):
    models = [{"name": name, "base_url": broken_url if name == "broken" and broken_url else url,
               "model": f"sim-{name}", "api_key_env": key_var, "max_retries": 1, "timeout_s": 10}
              for name in ("small", "broken")]
    tasks = [
        # broken answers 500 every time: tier 1 escalates with model_error, tier 2 answers
        {"name": "label", "prompt": "Ticket {id}: {text}", "tiers": ["broken", "small"]},
        # only the broken model: every job fails with model_error
        {"name": "dead", "prompt": "Ticket {id}: {text}", "tiers": ["broken"]},
    ]
    return {"models": models, "task_types": tasks}


def _start_cli(env, tmp_path, *args, **extra_env):
    return subprocess.Popen([sys.executable, "-m", "cascade.cli", *args], env=env.environ(**extra_env), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli(env, tmp_path, *args, **extra_env):
    return subprocess.run([sys.executable, "-m", "cascade.cli", *args], env=env.environ(**extra_env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def _database_text(env):
    """Every row of every table in the test schema, as Postgres' text form of the row."""
    tables = [t for (t,) in env.rows("SELECT table_name FROM information_schema.tables WHERE table_schema = :s "
                                     "AND table_type = 'BASE TABLE'", s=env.schema)]
    assert {"batches", "jobs", "attempts", "validations"} <= set(tables)
    return "\n".join(r for t in tables for (r,) in env.rows(f'SELECT t::text FROM "{t}" t'))


def _broker_text(env):
    """Every value under the test's Redis key prefix (queues hold task messages)."""
    publisher = CeleryPublisher.connect(env.settings(), env.settings().broker_url)
    try:
        with publisher.app.connection_for_write() as conn:
            client = conn.default_channel.client
            out = []
            for key in client.scan_iter(match=f"{env.prefix}*"):
                kind = client.type(key)
                if kind == b"list":
                    out += client.lrange(key, 0, -1)
                elif kind == b"hash":
                    out += [k + b"=" + v for k, v in client.hgetall(key).items()]
                elif kind == b"string":
                    out.append(client.get(key))
            return b"\n".join(out).decode(errors="replace")
    finally:
        publisher.close()


def test_api_key_is_never_stored_or_logged(env, sim, workers, tmp_path):
    # Given models whose key comes from an env var holding a sentinel, one of them answering 500 every time
    sentinel = f"sk-SENTINEL-{uuid.uuid4().hex}"
    server = sim(SimConfig(models={"broken": SimModel(p_500=1.0)}, unknown_models="default"))
    (tmp_path / "cascade.yaml").write_text(yaml.safe_dump(_config(server.url)))
    rows = "".join(json.dumps({"id": i, "text": f"ticket {i}"}) + "\n" for i in range(5))
    (tmp_path / "rows.jsonl").write_text(rows)
    key_env = {KEY_VAR: sentinel, "CASCADE_CONFIG": "cascade.yaml"}
    # (the circuit breaker left out: the broken model's every retry is the error path under test)
    worker = workers(concurrency=8, CASCADE_BREAKER_FAILURES="1000000", **{KEY_VAR: sentinel})
    # When batches go through the real CLI and real workers, and a bad submit fails
    procs = [_start_cli(env, tmp_path, "submit", task, file, **key_env)
             for task, file in (("label", "rows.jsonl"), ("dead", "rows.jsonl"), ("label", "cascade.yaml"))]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 2], outputs
    wait_for(lambda: env.scalar("SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed')") == 10, 45,
             "both batches to finish")
    # Every job is finished; stopping takes seconds even cold, and stderr is line-buffered, so the log is whole.
    worker.kill()
    # Then the error path really ran: 500s recorded per request, escalations and failures with model_error
    assert env.scalar("SELECT count(*) FROM attempts WHERE model = 'broken' AND error IS NOT NULL") == 20
    assert env.rows("SELECT task_type, status, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1") == [
        ("dead", "failed", 5), ("label", "succeeded", 5)]
    assert env.scalar("SELECT count(*) FROM jobs WHERE error LIKE '%server error (simulated)%'") == 5
    # And the sentinel is nowhere: database, broker, worker log, CLI output
    db = _database_text(env)
    assert KEY_VAR in db  # the batches' config snapshot names the variable...
    assert sentinel not in db  # ...never its value
    assert sentinel not in _broker_text(env)
    assert sentinel not in worker.log.read_text(errors="replace")
    for stdout, stderr in outputs:
        assert sentinel not in stdout + stderr


class _EchoHandler(BaseHTTPRequestHandler):
    """A careless gateway: answers 401 quoting the Authorization header it got."""

    seen: ClassVar[list[str]] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        type(self).seen.append(auth)
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {auth}"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    _EchoHandler.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_api_key_echoed_by_a_provider_is_not_stored(env, sim, echo_url, monkeypatch, caplog):
    # Given a model behind a gateway that quotes the key back in its 401 body
    sentinel = f"sk-SENTINEL-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_VAR, sentinel)
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    config = parse_config(_config(sim().url, broken_url=echo_url), "cascade.yaml")
    client = Client(settings, engine=env.engine, publisher=publisher, config=config)
    batch = client.submit("dead", [{"id": 1, "text": "hello"}])
    job_id = env.scalar("SELECT id FROM jobs WHERE batch_id = :b", b=batch.batch_id)
    providers = ProviderPool()
    # When the call stage runs (in-process: the same code a worker runs)
    run_call(StageContext(engine=env.engine, publisher=publisher, providers=providers, settings=settings), job_id, 1)
    providers.close()
    publisher.close()
    # Then the key was sent, the 401 halted the batch (its message stored), and the sentinel is neither stored
    # nor logged
    assert _EchoHandler.seen == [f"Bearer {sentinel}"]
    assert env.scalar("SELECT status FROM jobs WHERE id = :j", j=job_id) == "queued"
    assert "401" in env.scalar("SELECT halt_reason FROM batches WHERE id = :b", b=batch.batch_id)
    assert sentinel not in _database_text(env)
    assert sentinel not in caplog.text


@pytest.mark.parametrize("value", [None, ""])
def test_unset_key_variable_is_named_not_valued(monkeypatch, value):
    # Given a model whose api_key_env is unset (or empty)
    var = f"CASCADE_TEST_UNSET_{uuid.uuid4().hex[:8].upper()}"
    if value is not None:
        monkeypatch.setenv(var, value)
    model = ModelConfig(name="small", base_url="http://127.0.0.1:9/v1", model="m", api_key_env=var)
    # When its client is built, then the error names the variable and the config field
    with pytest.raises(ConfigError, match=rf"models\[small\]\.api_key_env: environment variable {var} is not set"):
        ChatProvider(model)


# --- the read-only role --------------------------------------------------------------------------


def _as_reader(env, sql):
    """Run ``sql`` as cascade_reader in a transaction that is rolled back."""
    with env.engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.execute(text("SET LOCAL ROLE cascade_reader"))
            result = conn.execute(text(sql))
            return result.all() if result.returns_rows else []
        finally:
            trans.rollback()


DENIED = [
    "SELECT * FROM jobs", "SELECT * FROM attempts", "SELECT * FROM batches", "SELECT * FROM validations",
    "SELECT * FROM alembic_version", "SELECT * FROM workers",
    "INSERT INTO batches (id, task_type, config, config_hash) VALUES ('x', 't', '{}', 'h')",
    "UPDATE jobs SET status = 'failed'", "DELETE FROM attempts",
    "INSERT INTO escalation_stats (task_type) VALUES ('x')",
    "CREATE TABLE reader_was_here (i int)",
    "CREATE VIEW reader_view AS SELECT 1 AS one",
]


def test_reader_role_selects_the_views_and_nothing_else(env, sim):
    # Given a submitted batch, so the views have rows
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    config = parse_config(_config(sim().url), "cascade.yaml")
    Client(settings, engine=env.engine, publisher=publisher, config=config).submit(
        "label", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}])
    publisher.close()
    # Then cascade_reader can read the three views (which see the rows) ...
    assert [tuple(r[:2]) for r in _as_reader(env, "SELECT task_type, jobs FROM escalation_stats")] == [("label", 2)]
    assert _as_reader(env, "SELECT * FROM escalation_reasons") == []
    assert _as_reader(env, "SELECT * FROM tier_stats") == []
    # ... and nothing else
    for sql in DENIED:
        with pytest.raises(DBAPIError) as caught:
            _as_reader(env, sql)
        assert "permission denied" in str(caught.value) or "cannot insert into view" in str(caught.value), sql
    # and it can neither log in nor escalate
    assert env.rows("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                    "WHERE rolname = 'cascade_reader'") == [(False, False, False, False)]


# --- prompt templates ----------------------------------------------------------------------------


PLACEHOLDERS = {
    "attribute": ("prompt", "Ticket {text.__class__}", "task_types[0].prompt: placeholder {text.__class__}"),
    "index": ("tiers", ["small", {"model": "small", "system": "Be {id[0]}"}],
              "task_types[0].tiers[1].system: placeholder {id[0]}"),
}


@pytest.mark.parametrize("case", list(PLACEHOLDERS))
def test_submit_refuses_templates_that_reach_attributes(env, sim, tmp_path, case):
    # Given a cascade.yaml whose template reaches into a value
    field, value, message = PLACEHOLDERS[case]
    data = _config(sim().url)
    data["task_types"][0][field] = value
    (tmp_path / "cascade.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "rows.jsonl").write_text('{"id": "1", "text": "a"}\n')
    # When a batch is submitted
    proc = _cli(env, tmp_path, "submit", "label", "rows.jsonl", CASCADE_CONFIG="cascade.yaml")
    # Then it is exit 2 naming cascade.yaml and the field path, and nothing was inserted
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert f"cascade.yaml: {message} is not a plain field name" in " ".join(proc.stderr.split())
    assert env.scalar("SELECT count(*) FROM batches") == 0


def test_row_values_are_not_templates():
    # A value that looks like a placeholder is inserted as text, never formatted again
    row = {"text": "{text.__class__.__init__.__globals__}", "id": "{0}"}
    assert render("{id}: {text}", row) == "{0}: {text.__class__.__init__.__globals__}"


def test_worker_without_the_key_variable_fails_jobs_naming_it(env, sim, workers):
    # Given models whose key variable is not set on the worker
    from tests.integration import scenario
    from tests.integration.audit import client as make_client

    client = make_client(env, sim(scenario.sim_config()).url)
    client._config = scenario.cascade_config(client.config.models[0].base_url, api_key_env="CASCADE_TEST_UNSET_KEY")
    batch = client.submit("label", scenario.rows(5, "label"), key_field="id").batch_id
    # When a worker runs the batch
    workers(concurrency=8)
    state = client.wait(batch, timeout=60, poll_s=0.2)
    # Then every tier is a model error naming the variable, and the jobs fail instead of hanging
    assert state.counts == {"failed": 5}
    reasons = {(r.tier, r.reason) for r in env.rows("SELECT tier, reason FROM escalation_reasons")}
    assert reasons == {(1, "model_error:config"), (2, "model_error:config"), (3, "model_error:config")}
    assert all("CASCADE_TEST_UNSET_KEY" in (r.error or "") for r in env.rows("SELECT error FROM jobs"))
    assert env.scalar("SELECT count(*) FROM attempts") == 0
