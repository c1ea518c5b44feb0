"""cascade.sim on real sockets: answers, determinism, faults, replay and concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from cascade.errors import ConfigError
from cascade.sim import Recording, SimConfig, SimModel, SimServer, expected_answer, load_recordings

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "reason": {"type": "string", "minLength": 12, "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
        "pick": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "ref": {"$ref": "#/$defs/point"},
    },
    "required": ["label", "score", "reason", "tags", "ratio", "ok", "note", "pick", "ref"],
    "additionalProperties": False,
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}

Factory = Callable[..., SimServer]  # the `sim` fixture of tests/conftest.py


def _one(**model: Any) -> SimConfig:
    return SimConfig(seed=7, models={"m": SimModel(**model)})


def _post(client: httpx.Client, server: SimServer, text: str, *, model: str = "m", n: int = 1, sample: int = 0,
          variant: str | None = None, **body: Any) -> httpx.Response:
    headers = {"X-Cascade-Model": model, "X-Cascade-Sample": str(sample)}
    if variant:
        headers["X-Cascade-Variant"] = variant
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    return client.post(f"{server.url}/chat/completions", headers=headers,
                       json={"model": "ignored", "messages": messages, "n": n, **body})


def _contents(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [c["message"]["content"] for c in resp.json()["choices"]]


def test_response_shape_and_usage_bill_the_prompt_once(sim: Factory) -> None:
    # Given a server whose answers are all correct
    server = sim(SimConfig(seed=7))
    # When asking for 3 samples starting at sample 5
    with httpx.Client() as client:
        resp = _post(client, server, "What is 2+2?", n=3, sample=5)
    # Then the body has the OpenAI shape and the prompt is billed once
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "m" and body["id"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    assert {c["message"]["role"] for c in body["choices"]} == {"assistant"}
    contents = _contents(resp)
    assert contents == [expected_answer(7, "What is 2+2?")] * 3
    assert contents[0].startswith("answer v")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 1 + len("Be brief.What is 2+2?") // 4
    assert usage["completion_tokens"] == sum(1 + len(c) // 4 for c in contents)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_health_models_and_stats(sim: Factory) -> None:
    server = sim(_one())
    base = server.url.removesuffix("/v1")
    with httpx.Client() as client:
        assert client.get(f"{base}/health").json() == {"ok": True}
        assert [m["id"] for m in client.get(f"{server.url}/models").json()["data"]] == ["m"]
        _post(client, server, "a")
        _post(client, server, "b", model="other")
        assert client.get(f"{base}/stats").json() == {
            "requests": 2, "by_model": {"m": 1, "other": 1}, "in_flight": 0, "max_in_flight": 1}
        client.post(f"{base}/stats/reset")
        assert client.get(f"{base}/stats").json()["requests"] == 0
        assert client.get(f"{base}/nope").status_code == 404
        assert client.post(f"{server.url}/chat/completions", content=b"{").status_code == 400


def test_same_request_gives_same_answer_and_outcome_predicts_it(sim: Factory) -> None:
    # Given a model with every outcome possible
    config = _one(p_correct=0.5, p_invalid_json=0.1, p_schema_violation=0.1, p_too_short=0.1)
    server = sim(config)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    seen = set()
    with httpx.Client() as client:
        for k in range(40):
            key = f"question {k}"
            # When asking twice for the same 4 samples
            first = _contents(_post(client, server, key, n=4, sample=2, response_format=SCHEMA_FORMAT))
            again = _contents(_post(client, server, key, n=4, sample=2, response_format=SCHEMA_FORMAT))
            # Then both answers agree and match what the config predicts
            assert first == again
            for i, content in enumerate(first):
                outcome = config.outcome("m", key, 2 + i)
                seen.add(outcome)
                assert content == config.content("m", key, 2 + i, SCHEMA_FORMAT)
                _check_outcome(outcome, content, expected_answer(7, key, SCHEMA_FORMAT), validator)
    assert seen == {"correct", "wrong", "invalid_json", "schema_violation", "too_short"}


def _check_outcome(outcome: str, content: str, correct: str, validator: jsonschema.Draft202012Validator) -> None:
    if outcome == "too_short":
        assert content == ""
    elif outcome == "invalid_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
    elif outcome == "schema_violation":
        assert not validator.is_valid(json.loads(content))
    else:
        assert validator.is_valid(json.loads(content))
        assert (content == correct) == (outcome == "correct")


@pytest.mark.parametrize("schema", [
    SCHEMA,
    {"type": "integer", "minimum": 10, "maximum": 12},
    {"type": "number", "maximum": -5},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "null"}}}}},
    {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]},
    {"allOf": [{"type": "object", "properties": {"a": {"const": 1}}}, {"required": ["a"]}]},
])
def test_correct_answers_validate_against_their_schema(schema: dict[str, Any]) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    for key in ("a", "b", "c", "a long question"):
        answer = expected_answer(3, key, rf)
        jsonschema.validate(json.loads(answer), schema)
        assert answer == json.dumps(json.loads(answer), separators=(",", ":"), sort_keys=True)
    assert expected_answer(3, "a", rf) == expected_answer(3, "a", rf)


def test_answer_formats_without_schema() -> None:
    assert json.loads(expected_answer(1, "q", {"type": "json_object"}))["answer"].startswith("v")
    assert expected_answer(1, "q") != expected_answer(2, "q") != expected_answer(1, "r")


def test_wrong_samples_differ_from_each_other_and_from_the_correct_answer(sim: Factory) -> None:
    server = sim(_one(p_correct=0.0))
    with httpx.Client() as client:
        for rf in (SCHEMA_FORMAT, {"type": "json_object"}, None):
            extra: dict[str, Any] = {"response_format": rf} if rf else {}
            contents = _contents(_post(client, server, "same key", n=8, **extra))
            assert len(set(contents)) == 8
            assert expected_answer(7, "same key", rf) not in contents


def test_system_prompt_and_model_do_not_change_the_correct_answer(sim: Factory) -> None:
    server = sim(SimConfig(seed=7))
    with httpx.Client() as client:
        a = _contents(_post(client, server, "q", model="small"))
        b = client.post(f"{server.url}/chat/completions", json={
            "model": "large", "messages": [{"role": "user", "content": "q"}]}).json()
    assert a[0] == b["choices"][0]["message"]["content"]


@pytest.mark.parametrize("fault", ["p_429", "p_500", "p_empty_body", "p_non_json_body", "p_garbage", "p_truncated",
                                   "p_huge"])
def test_each_fault_happens_when_certain(sim: Factory, fault: str) -> None:
    server = sim(_one(**{fault: 1.0}))
    with httpx.Client() as client:
        resp = _post(client, server, "q", n=2)
    correct = expected_answer(7, "q")
    if fault == "p_429":
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
        assert "rate limited" in resp.json()["error"]["message"]
    elif fault == "p_500":
        assert resp.status_code in (500, 502, 503)
    elif fault == "p_empty_body":
        assert resp.status_code == 200 and resp.content == b""
    elif fault == "p_non_json_body":
        assert resp.headers["content-type"] == "text/html" and resp.text == "<html>oops</html>"
    elif fault == "p_garbage":
        assert len(_contents(resp)) == 2 and correct not in _contents(resp)
    elif fault == "p_truncated":
        assert _contents(resp) == [correct[: len(correct) // 2]] * 2
        assert resp.json()["choices"][0]["finish_reason"] == "length"
    else:
        assert len(resp.content) >= 5 * 1024 * 1024


def test_no_retry_after_header_when_unset(sim: Factory) -> None:
    server = sim(_one(p_429=1.0, retry_after_s=None))
    with httpx.Client() as client:
        resp = _post(client, server, "q")
    assert resp.status_code == 429 and "Retry-After" not in resp.headers


def test_drop_closes_the_connection_without_a_response(sim: Factory) -> None:
    server = sim(_one(p_drop=1.0))
    with httpx.Client() as client, pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _post(client, server, "q")


def test_timeout_fault_outlasts_a_short_client_timeout(sim: Factory) -> None:
    server = sim(_one(p_timeout=1.0, hang_s=1))
    with httpx.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        _post(client, server, "q")


def test_a_retry_gets_a_fresh_fault_draw(sim: Factory) -> None:
    # Given a model failing half the requests, and a key whose first attempt fails
    config = _one(p_500=0.5)
    key = next(f"k{i}" for i in range(100) if config.fault("m", f"k{i}", 0, 0) == "500")
    server = sim(config)
    # When retrying until it succeeds
    statuses: list[int] = []
    with httpx.Client() as client:
        while not statuses or statuses[-1] != 200:
            statuses.append(_post(client, server, key).status_code)
            assert len(statuses) < 30
    # Then the sequence of failures is the one the config predicts
    predicted = [config.fault("m", key, 0, a) for a in range(len(statuses))]
    assert [s == 200 for s in statuses] == [f is None for f in predicted]
    assert statuses[0] != 200


def test_latency_and_jitter() -> None:
    config = _one(latency_ms=100, latency_jitter_ms=50)
    waits = [config.latency_s("m", f"k{i}", 0, 0) for i in range(50)]
    assert all(0.05 <= w <= 0.15 for w in waits) and len(set(waits)) > 40


def test_invalid_configs_are_rejected(tmp_path: Path) -> None:
    good = tmp_path / "sim.yaml"
    good.write_text("seed: 3\nmodels:\n  small: {p_correct: 0.7, p_429: 0.1, retry_after_s: null}\n")
    config = SimConfig.load(good)
    assert config.seed == 3 and config.model("small").retry_after_s is None and config.model("x") == SimModel()
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  small: {p_correct: 1.5}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: models.small.p_correct"):
        SimConfig.load(bad)
    with pytest.raises(ValueError, match="add up to more than 1"):
        SimModel(p_429=0.6, p_500=0.6)


# Replay


def _recording(rid: str, question: str, **responses: list[str]) -> dict[str, Any]:
    return {"id": rid, "input": {"question": question}, "gold": {"answer": "x"}, "responses": {
        key: {"prompt_tokens": 600 + i, "samples": [{"content": c, "completion_tokens": 10 + j}
                                                    for j, c in enumerate(samples)]}
        for i, (key, samples) in enumerate(responses.items())}}


@pytest.fixture
def recordings(tmp_path: Path) -> list[Recording]:
    rows = [
        _recording("date-0000", "Yesterday was April 30, 2021. What is the date today?", small=["s0", "s1", "s2", "s3"],
                   **{"small#cot": ["c0", "c1"]}),
        _recording("alpha", "alpha", small=["a"]),
        _recording("bravo", "bravo", small=["b"]),
        _recording("long", "alpha bravo charlie", small=["abc"]),
    ]
    path = tmp_path / "rec.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return load_recordings(path)


def test_replay_answers_recorded_samples_with_their_usage(sim: Factory, recordings: list[Recording]) -> None:
    server = sim(recordings=recordings)
    question = "Q: Yesterday was April 30, 2021. What is the date today? Answer in JSON."
    with httpx.Client() as client:
        # When asking for 2 samples from index 1, twice
        first = _post(client, server, question, model="small", n=2, sample=1)
        again = _post(client, server, question, model="small", n=2, sample=1)
        # Then samples 1 and 2 come back with the recorded usage, the same both times
        assert _contents(first) == _contents(again) == ["s1", "s2"]
        assert first.json()["usage"] == {"prompt_tokens": 600, "completion_tokens": 11 + 12, "total_tokens": 623}
        # A request past the end gets what is left; a variant has its own key
        assert _contents(_post(client, server, question, model="small", n=3, sample=3)) == ["s3"]
        assert _contents(_post(client, server, question, model="small", n=2, variant="cot")) == ["c0", "c1"]
        assert _post(client, server, question, model="small", sample=4).status_code == 404


def test_replay_matching_errors(sim: Factory, recordings: list[Recording]) -> None:
    server = sim(recordings=recordings)
    with httpx.Client() as client:
        # The longest matching input wins; equal lengths are ambiguous
        assert _contents(_post(client, server, "alpha bravo charlie", model="small")) == ["abc"]
        assert _contents(_post(client, server, "just alpha", model="small")) == ["a"]
        ambiguous = _post(client, server, "alpha and bravo", model="small")
        assert ambiguous.status_code == 409 and "'alpha'" in ambiguous.text and "'bravo'" in ambiguous.text
        missing = _post(client, server, "z" * 100 + " unknown", model="small")
        assert missing.status_code == 404 and "z" * 80 in missing.text and "z" * 81 not in missing.text
        unknown = _post(client, server, "alpha", model="large")
        assert unknown.status_code == 404 and "'large'" in unknown.text and "'alpha'" in unknown.text
        no_variant = _post(client, server, "alpha", model="small", variant="cot")
        assert no_variant.status_code == 404 and "'small#cot'" in no_variant.text


def test_replay_load_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text(json.dumps(_recording("a", "q", small=["x"])) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"rec.jsonl: line 2"):
        load_recordings(path)
    path.write_text(json.dumps(_recording("a", "q", small=["x"])) + "\n" + json.dumps({"id": "b", "input": {}}) + "\n"
                    + json.dumps(_recording("a", "r", small=["x"])))
    with pytest.raises(ConfigError, match=r"line 3: duplicate recording id 'a'"):
        load_recordings(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_recordings(tmp_path / "missing.jsonl")


# `cascade sim` as its own process


@pytest.fixture(scope="module")
def sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run ``serve()`` the way ``cascade sim`` does, in a subprocess; yield the URL it announces."""
    config = tmp_path_factory.mktemp("sim") / "sim.yaml"
    config.write_text("unknown_models: default\nmodels:\n  slow: {latency_ms: 200}\n  limited: {p_429: 1.0}\n")
    code = f"from cascade.sim import serve; serve(host='127.0.0.1', port=0, config_path={str(config)!r}, seed=5, " \
           "replay=None)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        assert line.startswith("cascade sim listening on http://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stderr.close()


def test_serve_uses_the_config_file_and_the_seed_flag(sim_process: str) -> None:
    with httpx.Client() as client:
        limited = client.post(f"{sim_process}/chat/completions", json={
            "model": "limited", "messages": [{"role": "user", "content": "q"}]})
        ok = client.post(f"{sim_process}/chat/completions", json={
            "model": "other", "messages": [{"role": "user", "content": "q"}]})
    assert limited.status_code == 429
    assert _contents(ok) == [expected_answer(5, "q")]


def test_300_concurrent_requests_overlap(sim_process: str) -> None:
    # The server runs in its own process: an in-process client would share the GIL with 300 handler threads
    # and measure itself. One pool of 300 connections costs httpcore O(connections) per response, so the
    # load is spread over 30 clients sharing one SSL context (each context costs ~20 ms to build).
    base = sim_process.removesuffix("/v1")
    httpx.post(f"{base}/stats/reset")

    async def run() -> list[httpx.Response]:
        ctx = ssl.create_default_context()
        clients = [httpx.AsyncClient(timeout=10, verify=ctx) for _ in range(30)]
        try:
            return await asyncio.gather(*[clients[i % 30].post(
                f"{sim_process}/chat/completions", headers={"X-Cascade-Model": "slow"},
                json={"messages": [{"role": "user", "content": f"q{i}"}]}) for i in range(300)])
        finally:
            await asyncio.gather(*[c.aclose() for c in clients])

    # Given a model answering in 200 ms, when 300 requests are sent at once
    start = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - start
    # Then they all succeed, overlapping rather than queueing
    assert [r.status_code for r in responses] == [200] * 300
    assert elapsed < 2.0
    stats = httpx.get(f"{base}/stats").json()
    assert stats["requests"] == 300 and stats["in_flight"] == 0 and stats["max_in_flight"] >= 250
