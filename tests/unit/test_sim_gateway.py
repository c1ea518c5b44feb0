"""cascade.sim behaving like real backends and gateways (PROVIDERS.md), read back through cascade.providers.

Each simulated behaviour is checked twice: on the wire (the body and headers a real backend sends) and through
``ChatProvider`` (what the cascade makes of it), so the two modules are known to agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.config import ModelConfig
from cascade.errors import ProviderConfigError, ProviderNUnsupported, ProviderRateLimited
from cascade.providers import ChatProvider, Completion
from cascade.sim import SimConfig, SimModel, SimPrice, SimServer, _go_duration, expected_answer

Factory = Callable[..., SimServer]  # the `sim` fixture of tests/conftest.py


@pytest.fixture
def provider() -> Iterator[Callable[[SimServer, str], ChatProvider]]:
    made: list[ChatProvider] = []

    def make(server: SimServer, name: str = "m") -> ChatProvider:
        made.append(ChatProvider(ModelConfig(name=name, base_url=server.url, model=f"sim-{name}", timeout_s=5)))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _one(**model: Any) -> SimConfig:
    return SimConfig(seed=7, models={"m": SimModel(**model)})


def _post(server: SimServer, text: str = "q", *, model: str | None = "m", n: int = 1, **body: Any) -> httpx.Response:
    headers = {"X-Cascade-Model": model} if model else {}
    return httpx.post(f"{server.url}/chat/completions", headers=headers,
                      json={"model": body.pop("body_model", "sim-m"), "n": n,
                            "messages": [{"role": "user", "content": text}], **body})


def _ask(p: ChatProvider, text: str = "q", *, n: int = 1, name: str = "m", sample: int = 0) -> Completion:
    return p.complete([{"role": "user", "content": text}], n=n, max_tokens=32, temperature=0.5, response_format=None,
                      headers={"X-Cascade-Model": name, "X-Cascade-Sample": str(sample)})


# --- stream ------------------------------------------------------------------------------------------


def test_stream_true_is_refused_with_a_clear_400(sim: Factory) -> None:
    # Given any sim, when a client asks it to stream
    resp = _post(sim(), stream=True)
    # Then it answers 400 in OpenAI's error shape, naming the parameter, rather than a non-streamed body
    error = resp.json()["error"]
    assert resp.status_code == 400
    assert "stream" in error["message"] and "not supported" in error["message"]
    assert (error["param"], error["code"], error["type"]) == ("stream", "unsupported_value", "invalid_request_error")
    # And "stream": false is fine
    assert _post(sim(), stream=False).status_code == 200


# --- unknown models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "name", "known"),
    [
        (SimConfig(models={"small": SimModel()}), "small", True),
        (SimConfig(models={"small": SimModel()}), "smal", False),
        (SimConfig(models={"small": SimModel()}, unknown_models="default"), "smal", True),
        (SimConfig(), "anything", True),  # no model list: every name is `default`
        (SimConfig(unknown_models="404"), "anything", False),
        (SimConfig(default=SimModel(p_too_short=1.0), models={"a": SimModel()}), "b", True),  # default set: used
        (SimConfig(models={"a": SimModel()}, unknown_models="404", default=SimModel()), "b", False),
        (SimConfig.model_validate({"models": {"a": {}}, "default": {}}), "b", True),
    ],
)
def test_which_model_names_the_sim_serves(config: SimConfig, name: str, known: bool) -> None:
    assert config.knows(name) is known


def test_an_unknown_model_gets_an_openai_404_naming_it_and_the_known_ones(sim: Factory) -> None:
    # Given a sim that lists its models
    server = sim(SimConfig(models={"small": SimModel(), "large": SimModel()}))
    # When a client names another model, in the X-Cascade-Model header or, without it, in the body
    by_header = _post(server, model="smal")
    by_body = _post(server, model=None, body_model="gpt-4o")
    # Then each gets a 404 model_not_found naming the model and the ones it serves
    for resp, name in ((by_header, "smal"), (by_body, "gpt-4o")):
        error = resp.json()["error"]
        assert resp.status_code == 404
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert f"`{name}`" in error["message"] and "large, small" in error["message"]
    # And a known one still answers
    assert _post(server, model="small").status_code == 200


def test_unknown_models_default_answers_any_name(sim: Factory, tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("unknown_models: default\nmodels:\n  small: {}\n")
    server = sim(SimConfig.load(path))
    assert _post(server, model="whatever").status_code == 200


def test_an_unknown_model_is_a_config_error_for_the_provider(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    server = sim(SimConfig(models={"small": SimModel()}))
    with pytest.raises(ProviderConfigError) as info:
        _ask(provider(server, "smal"), name="smal")
    assert info.value.kind == "config" and info.value.reason == "model" and info.value.status == 404
    assert "`smal` does not exist" in info.value.provider_message


# --- n -----------------------------------------------------------------------------------------------


def test_a_backend_that_ignores_n_answers_one_choice(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    # Given a model that ignores n (Ollama, LiteLLM with drop_params)
    server = sim(_one(n_support="ignored", p_correct=0.5))
    # When 3 samples from sample 4 are asked for
    done = _ask(provider(server), "k", n=3, sample=4)
    # Then one choice comes back, sample 4's, and the other two are missing (not empty)
    assert done.choices_returned == 1 and done.n_requested == 3 and done.missing == 2
    assert done.contents == [server.config.content("m", "k", 4)]


def test_a_backend_that_rejects_n_answers_litellms_400(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    # Given a model behind LiteLLM whose provider takes no n
    server = sim(_one(n_support="rejected"))
    # When n=3 is sent, the body is LiteLLM's UnsupportedParamsError; the provider reads it as "n unsupported"
    resp = _post(server, n=3)
    assert resp.status_code == 400
    assert "UnsupportedParamsError" in resp.json()["error"]["message"] and "['n']" in resp.json()["error"]["message"]
    with pytest.raises(ProviderNUnsupported) as info:
        _ask(provider(server), n=3)
    assert info.value.kind == "n_unsupported" and info.value.status == 400
    # And one sample per request works
    assert _ask(provider(server), n=1).contents == [expected_answer(7, "q")]


# --- usage -------------------------------------------------------------------------------------------


def test_cached_and_reasoning_tokens_are_reported(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    # Given a model that serves 80% of the prompt from cache and thinks 50 tokens per choice
    server = sim(_one(cached_prompt_fraction=0.8, reasoning_tokens=50))
    text = "x" * 400
    # When 2 choices are asked for
    body = _post(server, text, n=2).json()
    usage = body["usage"]
    prompt = 1 + len(text) // 4
    visible = sum(1 + len(c["message"]["content"]) // 4 for c in body["choices"])
    # Then usage carries both details, reasoning counted inside completion_tokens
    assert usage["prompt_tokens"] == prompt and usage["prompt_tokens_details"] == {"cached_tokens": int(prompt * 0.8)}
    assert usage["completion_tokens"] == visible + 100
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 100}
    # And the provider reads them
    done = _ask(provider(server), text, n=2)
    assert (done.input_tokens, done.cached_tokens) == (prompt, int(prompt * 0.8))
    assert (done.output_tokens, done.reasoning_tokens) == (visible + 100, 100)


def test_usage_has_no_details_by_default(sim: Factory) -> None:
    usage = _post(sim(_one()), n=2).json()["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}


# --- refusals and filters ----------------------------------------------------------------------------


def test_refusals_and_content_filter_follow_the_config(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    # Given a model that refuses a third of its samples and has a third filtered
    config = _one(p_refusal=1 / 3, p_content_filter=1 / 3)
    server = sim(config)
    seen = set()
    for k in range(12):
        # When 4 samples are asked for
        done = _ask(provider(server), f"key {k}", n=4)
        for i, choice in enumerate(done.choices):
            blocked = config.blocked("m", f"key {k}", i)
            seen.add(blocked)
            # Then each sample is what SimConfig.blocked predicts
            if blocked == "refusal":
                assert choice.content is None and choice.refusal and choice.blocked == "refused"
                assert choice.finish_reason == "stop"
            elif blocked == "content_filter":
                assert choice.content == "" and choice.finish_reason == "content_filter"
                assert choice.refusal is None and choice.blocked == "content_filter"
            else:
                assert choice.content == config.content("m", f"key {k}", i) and choice.blocked is None
    assert seen == {None, "refusal", "content_filter"}


def test_new_options_do_not_shift_existing_draws() -> None:
    # Given the same model with and without the new per-sample and per-request options
    base: dict[str, Any] = {"p_correct": 0.5, "p_invalid_json": 0.1, "p_429": 0.2, "p_500": 0.2}
    plain = SimConfig(seed=3, models={"m": SimModel(**base)})
    extra = SimConfig(seed=3, models={"m": SimModel(**base, p_refusal=0.3, p_content_filter=0.2,
                                                     cached_prompt_fraction=0.5, reasoning_tokens=9)})
    # Then every outcome, content, fault and latency is the same
    for k in range(200):
        key = f"k{k}"
        assert plain.outcome("m", key, k % 5) == extra.outcome("m", key, k % 5)
        assert plain.content("m", key, k % 5) == extra.content("m", key, k % 5)
        assert plain.fault("m", key, 0, k % 3) == extra.fault("m", key, 0, k % 3)
        assert plain.latency_s("m", key, 0, 0) == extra.latency_s("m", key, 0, 0)


def test_refusal_probabilities_are_validated() -> None:
    with pytest.raises(ValueError, match="p_refusal \\+ p_content_filter"):
        SimModel(p_refusal=0.6, p_content_filter=0.6)


# --- 429 headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "header", "value"),
    [
        ("seconds", "Retry-After", "7"),
        ("ms", "retry-after-ms", "7000"),
        ("litellm", "llm_provider-retry-after", "7"),
        ("openai_reset", "x-ratelimit-reset-requests", "7s"),
        ("http_date", "Retry-After", None),
    ],
)
def test_each_retry_after_style_gives_the_same_wait(sim: Factory, provider: Callable[..., ChatProvider], style: str,
                                                    header: str, value: str | None) -> None:
    # Given a model that always answers 429 asking for 7 s, in one of the ways gateways say it
    server = sim(_one(p_429=1.0, retry_after_s=7, retry_after_style=style))
    # Then the header is there, in its form
    resp = _post(server)
    assert resp.status_code == 429
    if value is not None:
        assert resp.headers[header] == value
    else:
        assert resp.headers[header].endswith(" GMT")
    # And the provider reads about 7 s from it (an HTTP date has whole seconds, rounded up)
    with pytest.raises(ProviderRateLimited) as info:
        _ask(provider(server))
    assert info.value.retry_after is not None
    assert 7 <= info.value.retry_after <= 8 if style == "http_date" else info.value.retry_after == 7


def test_openai_reset_style_says_the_request_limit_is_spent(sim: Factory) -> None:
    resp = _post(sim(_one(p_429=1.0, retry_after_s=90.5, retry_after_style="openai_reset")))
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.headers["x-ratelimit-reset-requests"] == "1m30.5s"
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) > 0


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (0.5, "500ms"), (1, "1s"), (7, "7s"), (360, "6m0s"),
                                                (90.5, "1m30.5s"), (3723, "1h2m3s")])
def test_go_duration(seconds: float, text: str) -> None:
    assert _go_duration(seconds) == text


# --- gateway headers ---------------------------------------------------------------------------------


def test_gateway_headers_and_cost(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    # Given a model behind a simulated LiteLLM that fell back to another model and reports its cost
    price = SimPrice(input_per_mtok=Decimal("2.5"), cached_input_per_mtok=Decimal("1.25"), output_per_mtok=Decimal(10))
    server = sim(_one(gateway_headers=True, served_model="gpt-4o-2024-08-06", gateway_price=price,
                      cached_prompt_fraction=0.5))
    # When a request is answered
    resp = _post(server, "y" * 200, n=2)
    usage = resp.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    expected = (Decimal(usage["prompt_tokens"] - cached) * Decimal("2.5") + cached * Decimal("1.25")
                + usage["completion_tokens"] * 10) / 1_000_000
    # Then it carries a request id, a call id, the model that answered and the exact cost
    assert resp.headers["x-request-id"].startswith("req_") and len(resp.headers["x-litellm-call-id"]) == 36
    assert resp.headers["x-litellm-model-name"] == resp.json()["model"] == "gpt-4o-2024-08-06"
    assert Decimal(resp.headers["x-litellm-response-cost"]) == expected
    # And the provider reads them
    done = _ask(provider(server), "y" * 200, n=2)
    assert done.served_model == "gpt-4o-2024-08-06" and done.gateway_cost_usd == expected
    assert done.request_id is not None and len(done.request_id) == 36  # LiteLLM's call id comes first


def test_no_gateway_headers_by_default(sim: Factory, provider: Callable[..., ChatProvider]) -> None:
    resp = _post(sim(_one()))
    assert not {"x-request-id", "x-litellm-call-id", "x-litellm-response-cost"} & set(resp.headers)
    done = _ask(provider(sim(_one())))
    assert (done.request_id, done.gateway_cost_usd, done.served_model) == (None, None, "m")
