"""Unit tests for cascade.config: loading cascade.yaml, its errors, tier resolution, settings."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from cascade.config import (
    CascadeConfig,
    CascadeSettings,
    Price,
    TaskSnapshot,
    load_config,
    load_settings,
    parse_config,
    render,
)
from cascade.errors import ConfigError

# DESIGN.md's "Task-type config" example, with the schema's `{...}` filled in and the two models its
# tiers name besides `small`.
DESIGN_YAML = """\
models:
  - name: small
    base_url: https://api.example.com/v1
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
    price: {input_per_mtok: 0.15, output_per_mtok: 0.60}
    timeout_s: 30
    rate_limit_rpm: 3000
    supports_n: true
  - name: medium
    base_url: https://api.example.com/v1
    model: gpt-4o
    price: {input_per_mtok: 2.50, output_per_mtok: 10}
  - name: large
    base_url: https://other.example.com/v1/
    model: big-one
    supports_n: false
task_types:
  - name: invoice_fields
    system: You extract fields from invoices. Answer with JSON only.
    prompt: "Invoice text:\\n{text}"
    output: json
    schema: {type: object, required: [total, currency], properties: {total: {type: number}, currency: {type: string}}}
    length: {min_chars: 2, max_chars: 2000}
    self_consistency: {samples: 3, min_agreement: 0.6, fields: [total, currency]}
    tiers: [small, medium, {model: large, samples: 1}]
    max_tokens: 512
    temperature: 0.7
    on_exhausted: fail
"""


def design() -> dict[str, Any]:
    """A fresh, mutable copy of the DESIGN.md example."""
    return copy.deepcopy(_DESIGN)


_DESIGN: dict[str, Any] = yaml.safe_load(DESIGN_YAML)


def task0(data: dict[str, Any]) -> dict[str, Any]:
    return data["task_types"][0]


def config_error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cascade.yaml")
    return info.value


# --- loading ---------------------------------------------------------------------------------------


def test_load_config_reads_the_design_example(tmp_path: Path) -> None:
    # Given DESIGN.md's example written to cascade.yaml
    path = tmp_path / "cascade.yaml"
    path.write_text(DESIGN_YAML, encoding="utf-8")

    # When it is loaded
    config = load_config(path)

    # Then every field is read, typed and defaulted as documented
    assert isinstance(config, CascadeConfig)
    assert [m.name for m in config.models] == ["small", "medium", "large"]
    small = config.model("small")
    assert small.model == "gpt-4o-mini"
    assert small.api_key_env == "OPENAI_API_KEY"
    assert small.price == Price(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    assert (small.timeout_s, small.rate_limit_rpm, small.supports_n, small.max_retries) == (30.0, 3000, True, 3)
    assert config.model("large").supports_n is False
    task = config.task("invoice_fields")
    assert task.output == "json"
    assert task.schema_ is not None and task.schema_["required"] == ["total", "currency"]
    assert (task.length.min_chars, task.length.max_chars) == (2, 2000)
    assert task.self_consistency.samples == 3
    assert task.self_consistency.fields == ["total", "currency"]
    assert task.tiers[:2] == ["small", "medium"]
    assert (task.max_tokens, task.temperature, task.on_exhausted) == (512, 0.7, "fail")


def test_parse_config_equals_load_config(tmp_path: Path) -> None:
    # Given the same document as a file and as parsed YAML
    path = tmp_path / "cascade.yaml"
    path.write_text(DESIGN_YAML, encoding="utf-8")

    # When both are validated
    # Then they give equal configs
    assert load_config(str(path)) == parse_config(design(), "cascade.yaml")


def test_min_agreement_is_an_exact_decimal() -> None:
    # Given min_agreement: 0.6 in YAML (a float to the YAML parser)
    # When it is loaded
    sc = parse_config(design(), "cascade.yaml").task("invoice_fields").self_consistency

    # Then it is exactly Decimal("0.6"), not the binary float's expansion
    assert type(sc.min_agreement) is Decimal
    assert sc.min_agreement == Decimal("0.6")
    assert sc.min_agreement * 3 == Decimal("1.8")


@pytest.mark.parametrize(
    ("input_price", "output_price", "input_tokens", "output_tokens", "expected"),
    [
        ("0.15", "0.60", 1000, 2000, Decimal("0.00135")),
        ("0.15", "0.60", 1, 0, Decimal("0.00000015")),
        ("0.15", "0.60", 0, 1, Decimal("0.0000006")),
        ("0.15", "0.60", 123_456_789, 987_654_321, Decimal("611.11111095")),
        ("2.50", "10", 3, 7, Decimal("0.0000775")),
        ("0", "0", 10**9, 10**9, Decimal(0)),
    ],
)
def test_price_cost_is_exact(
    input_price: str, output_price: str, input_tokens: int, output_tokens: int, expected: Decimal
) -> None:
    # Given a price per million tokens
    price = Price(input_per_mtok=Decimal(input_price), output_per_mtok=Decimal(output_price))

    # When a request's cost is computed
    cost = price.cost(input_tokens, output_tokens)

    # Then it is the exact product, never rounded to a float or to cents
    assert type(cost) is Decimal
    assert cost == expected


def test_price_from_yaml_floats_is_exact() -> None:
    # Given prices written as YAML floats (0.15 is not exact in binary)
    price = parse_config(design(), "cascade.yaml").model("small").price

    # When a cost is computed from them
    # Then it matches decimal arithmetic on the written digits
    assert price.cost(1_000_000, 1_000_000) == Decimal("0.75")


# --- errors: file and dotted path ------------------------------------------------------------------


def test_unknown_model_message_is_exact() -> None:
    # Given a tier that names a model cascade.yaml does not define
    data = design()
    task0(data)["tiers"][2] = {"model": "larg", "samples": 1}

    # When it is validated
    err = config_error(data)

    # Then the message names the file, the dotted path and the model, exactly as DESIGN.md shows
    assert str(err) == "cascade.yaml: task_types[0].tiers[2]: unknown model 'larg' (known: large, medium, small)"
    assert (err.file, err.path) == ("cascade.yaml", "task_types[0].tiers[2]")


def test_unknown_model_as_a_plain_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given cascade.yaml on disk whose last tier is the bare name 'larg'
    monkeypatch.chdir(tmp_path)
    Path("cascade.yaml").write_text(DESIGN_YAML.replace("{model: large, samples: 1}", "larg"), encoding="utf-8")

    # When it is loaded by its relative name
    with pytest.raises(ConfigError) as info:
        load_config("cascade.yaml")

    # Then the message is the same
    assert str(info.value) == "cascade.yaml: task_types[0].tiers[2]: unknown model 'larg' (known: large, medium, small)"


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _duplicate_task(data: dict[str, Any]) -> None:
    data["task_types"].append(copy.deepcopy(task0(data)))


def _duplicate_model(data: dict[str, Any]) -> None:
    data["models"].append(copy.deepcopy(data["models"][0]))


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        pytest.param(_set(("task_types", 0, "schema"), {"type": "objekt"}), "task_types[0].schema",
                     "not a valid JSON Schema", id="bad-json-schema"),
        pytest.param(_set(("task_types", 0, "schema"), {"required": "total"}), "task_types[0].schema",
                     "not a valid JSON Schema", id="bad-json-schema-required"),
        pytest.param(_set(("task_types", 0, "self_consistency", "samples"), "three"),
                     "task_types[0].self_consistency.samples", "valid integer", id="samples-three"),
        pytest.param(_set(("task_types", 0, "tiers", 2), {"model": "large", "samples": "three"}),
                     "task_types[0].tiers[2].samples", "valid integer", id="tier-samples-three"),
        pytest.param(_set(("task_types", 0, "tiers", 2), {"model": "large", "temperature": 9}),
                     "task_types[0].tiers[2].temperature", "less than or equal to 2", id="tier-temperature"),
        pytest.param(_set(("task_types", 0, "self_consistency", "samples"), 0),
                     "task_types[0].self_consistency.samples", "greater than or equal to 1", id="samples-zero"),
        pytest.param(_set(("task_types", 0, "self_consistency", "min_agreement"), 1.5),
                     "task_types[0].self_consistency.min_agreement", "less than or equal to 1", id="agreement"),
        pytest.param(_set(("task_types", 0, "temperature"), "hot"), "task_types[0].temperature", "valid number",
                     id="temperature-hot"),
        pytest.param(_set(("task_types", 0, "output"), "xml"), "task_types[0].output", "'json' or 'text'",
                     id="output-literal"),
        pytest.param(_set(("task_types", 0, "tiers"), []), "task_types[0].tiers", "at least 1", id="no-tiers"),
        pytest.param(_set(("task_types", 0, "bogus"), 1), "task_types[0].bogus", "Extra inputs", id="extra-key"),
        pytest.param(_set(("models", 1, "price"), {"input_per_mtok": "cheap"}), "models[1].price.input_per_mtok",
                     "valid decimal", id="price"),
        pytest.param(_set(("models", 0, "timeout_s"), 0), "models[0].timeout_s", "greater than 0", id="timeout"),
        pytest.param(_set(("task_types", 0, "output"), "text"), "task_types[0].schema", "a schema needs output: json",
                     id="schema-needs-json"),
        pytest.param(_duplicate_task, "task_types[1].name", "duplicate task type 'invoice_fields'", id="dup-task"),
        pytest.param(_duplicate_model, "models", "duplicate model name", id="dup-model"),
    ],
)
def test_errors_name_file_and_dotted_path(
    mutate: Callable[[dict[str, Any]], None], path: str, fragment: str
) -> None:
    # Given the DESIGN.md example with one mistake
    data = design()
    mutate(data)

    # When it is validated
    err = config_error(data)

    # Then the error names the file and the field's dotted path, then says what is wrong
    assert (err.file, err.path) == ("cascade.yaml", path)
    assert str(err).startswith(f"cascade.yaml: {path}: ")
    assert fragment in str(err)


def _with_variants(data: dict[str, Any]) -> dict[str, Any]:
    task = task0(data)
    variant = {"name": "v", "prompt": "Invoice: {text}", "samples": 2}
    task["self_consistency"]["variants"] = [dict(variant)]
    task["tiers"][2] = {"model": "large", "variants": [dict(variant)]}
    return task


@pytest.mark.parametrize(
    "placeholder",
    ["{text.__class__}", "{text.__class__.__init__.__globals__}", "{text[0]}", "{text!r}", "{text:>10}",
     "{0}", "{}", "{text"],
)
def test_prompt_allows_only_plain_fields(placeholder: str) -> None:
    # Given a prompt using attributes, indexes, conversions, formats, positions or a lone brace
    data = design()
    task0(data)["prompt"] = f"Look: {placeholder}"

    # When the config is loaded
    err = config_error(data)

    # Then it is refused, naming the prompt's path, before any row is rendered with it
    assert (err.file, err.path) == ("cascade.yaml", "task_types[0].prompt")
    assert str(err).startswith("cascade.yaml: task_types[0].prompt: ")


TEMPLATES: list[tuple[str | int, ...]] = [
    ("prompt",),
    ("system",),
    ("tiers", 2, "prompt"),
    ("tiers", 2, "system"),
    ("self_consistency", "variants", 0, "prompt"),
    ("self_consistency", "variants", 0, "system"),
    ("tiers", 2, "variants", 0, "prompt"),
    ("tiers", 2, "variants", 0, "system"),
]


def _dotted(parts: tuple[str | int, ...]) -> str:
    return "task_types[0]" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


@pytest.mark.parametrize("where", TEMPLATES, ids=_dotted)
def test_every_template_is_checked(where: tuple[str | int, ...]) -> None:
    # Given a bad placeholder in one template (task, tier or variant; prompt or system)
    data = design()
    _set(where, "Look: {text.__class__}")(_with_variants(data))

    # When the config is loaded
    err = config_error(data)

    # Then it is refused at load, naming that template's path (render would otherwise run it on a row)
    path = _dotted(where)
    assert (err.file, err.path) == ("cascade.yaml", path)
    assert str(err).startswith(f"cascade.yaml: {path}: ")


def test_escaped_braces_are_not_placeholders() -> None:
    # Given a prompt with literal braces written as {{ }}
    data = design()
    task0(data)["prompt"] = 'Answer like {{"total": 1}} for: {text}'

    # When it is loaded
    # Then it is accepted
    assert parse_config(data, "cascade.yaml").task("invoice_fields").prompt.startswith("Answer like")


def test_top_level_must_be_a_mapping() -> None:
    # Given a YAML document that is a list
    # When it is validated
    err = config_error(["models"])

    # Then the error names the file
    assert err.file == "cascade.yaml"
    assert str(err).startswith("cascade.yaml: ")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    # Given cascade.yaml with an unclosed flow sequence on line 3
    path = tmp_path / "cascade.yaml"
    path.write_text("models:\n  - name: small\n    base_url: [oops\ntask_types: []\n", encoding="utf-8")

    # When it is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Then the error names the file and a line
    err = info.value
    assert err.file == str(path)
    assert err.path is not None and err.path.startswith("line ")
    assert str(err).startswith(f"{path}: line ")
    assert "not valid YAML" in str(err)


def test_yaml_tab_error_names_its_line(tmp_path: Path) -> None:
    # Given a tab used for indentation on line 2
    path = tmp_path / "cascade.yaml"
    path.write_text("models: []\n\ttask_types: []\n", encoding="utf-8")

    # When it is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Then the error points at line 2
    assert info.value.path == "line 2"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    # Given a path where there is no file
    path = tmp_path / "nope.yaml"

    # When it is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)

    # Then the error names the file and says it cannot be read
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "cannot read config" in str(info.value)


def test_unknown_task_type_names_the_known_ones() -> None:
    # Given a valid config
    config = parse_config(design(), "cascade.yaml")

    # When a task type it does not define is asked for
    with pytest.raises(ConfigError) as info:
        config.snapshot("invoice")

    # Then the error names it and lists the known ones
    assert "'invoice'" in str(info.value)
    assert "invoice_fields" in str(info.value)


# --- TaskSnapshot.tier(): overrides ------------------------------------------------------------------


def _override_config() -> TaskSnapshot:
    data = design()
    task = task0(data)
    task["tiers"] = [
        "small",
        {"model": "medium", "samples": 5, "min_agreement": 0.8, "prompt": "Again: {text}", "system": "Be careful.",
         "max_tokens": 1024, "temperature": 0.0},
        {"model": "large", "variants": [
            {"name": "terse", "prompt": "Fields of {text}", "samples": 2},
            {"name": "verbose", "prompt": "Read this invoice: {text}", "system": "You are an accountant.",
             "samples": 3},
        ]},
        {"model": "large", "min_agreement": 0},
    ]
    return parse_config(data, "cascade.yaml").snapshot("invoice_fields")


@pytest.mark.parametrize(
    ("index", "attribute", "expected"),
    [
        # tier 1 is a bare model name: everything comes from the task type
        (1, "samples", 3),
        (1, "min_agreement", Decimal("0.6")),
        (1, "prompt", "Invoice text:\n{text}"),
        (1, "system", "You extract fields from invoices. Answer with JSON only."),
        (1, "max_tokens", 512),
        (1, "temperature", 0.7),
        (1, "variants", None),
        # tier 2 overrides every scalar (temperature 0.0 is a value, not "unset")
        (2, "samples", 5),
        (2, "min_agreement", Decimal("0.8")),
        (2, "prompt", "Again: {text}"),
        (2, "system", "Be careful."),
        (2, "max_tokens", 1024),
        (2, "temperature", 0.0),
        # tier 3 has variants: its samples are theirs, summed
        (3, "samples", 5),
        (3, "min_agreement", Decimal("0.6")),
        # tier 4 sets min_agreement to 0, which must not fall back to the task's 0.6
        (4, "min_agreement", Decimal(0)),
        (4, "samples", 3),
    ],
)
def test_tier_overrides(index: int, attribute: str, expected: Any) -> None:
    # Given a task type whose tiers override different fields
    snap = _override_config()

    # When tier ``index`` is resolved
    tier = snap.tier(index)

    # Then each field is the tier's override, or the task type's value when not overridden
    assert getattr(tier, attribute) == expected
    assert type(getattr(tier, attribute)) is type(expected)


def test_resolved_tier_carries_index_model_and_variants() -> None:
    # Given the override config
    snap = _override_config()

    # When its tiers are resolved
    tiers = [snap.tier(i) for i in range(1, snap.tier_count + 1)]

    # Then each knows its 1-based index and its model, and variants keep their order
    assert [t.index for t in tiers] == [1, 2, 3, 4]
    assert [t.model.name for t in tiers] == ["small", "medium", "large", "large"]
    assert tiers[2].variants is not None
    assert [(v.name, v.samples) for v in tiers[2].variants] == [("terse", 2), ("verbose", 3)]


def test_task_level_variants_are_inherited_unless_a_tier_sets_samples() -> None:
    # Given variants on the task type, a bare tier and a tier that sets samples
    data = design()
    task = task0(data)
    task["self_consistency"]["variants"] = [
        {"name": "a", "prompt": "A {text}", "samples": 1},
        {"name": "b", "prompt": "B {text}", "samples": 4},
    ]
    task["tiers"] = ["small", {"model": "medium", "samples": 2}]
    snap = parse_config(data, "cascade.yaml").snapshot("invoice_fields")

    # When both tiers are resolved
    bare, counted = snap.tier(1), snap.tier(2)

    # Then the bare tier votes the variants (1 + 4 samples), the other its plain prompt twice
    assert bare.variants is not None and [v.name for v in bare.variants] == ["a", "b"]
    assert bare.samples == 5
    assert counted.variants is None
    assert counted.samples == 2


def test_snapshot_holds_only_the_models_its_tiers_use() -> None:
    # Given a task type whose tiers use small and large, and a model nobody uses
    data = design()
    data["models"].append({"name": "unused", "base_url": "http://x/v1", "model": "u"})
    task0(data)["tiers"] = ["small", {"model": "large"}]

    # When its snapshot is taken
    snap = parse_config(data, "cascade.yaml").snapshot("invoice_fields")

    # Then it holds exactly those two models
    assert sorted(snap.models) == ["large", "small"]
    assert snap.tier_count == 2


# --- render ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "row", "expected"),
    [
        ("{text}", {"text": "hi"}, "hi"),
        ("n={n}", {"n": 3}, "n=3"),
        ("{x}", {"x": 1.5}, "1.5"),
        ("{b}", {"b": True}, "true"),
        ("{v}", {"v": None}, "null"),
        ("{d}", {"d": {"a": [1, "é"]}}, '{"a": [1, "é"]}'),
        ("{items}", {"items": ["x", 2]}, '["x", 2]'),
        ("{s}", {"s": "{other}"}, "{other}"),
        ("{{literal}} {t}", {"t": "x"}, "{literal} x"),
        ("{a}-{a}", {"a": "z", "unused": [1]}, "z-z"),
    ],
)
def test_render(template: str, row: dict[str, Any], expected: str) -> None:
    # Given a template and a row (values of any JSON type)
    # When it is rendered
    # Then strings go in as they are and everything else as JSON, never re-formatted
    assert render(template, row) == expected


# --- snapshot hash -----------------------------------------------------------------------------------


def _hash(mutate: Callable[[dict[str, Any]], None] | None = None) -> str:
    data = design()
    if mutate is not None:
        mutate(data)
    return parse_config(data, "cascade.yaml").snapshot("invoice_fields").config_hash()


def _add_other_task(data: dict[str, Any]) -> None:
    data["task_types"].append({"name": "other", "prompt": "{x}", "tiers": ["small"]})


def _add_unused_model(data: dict[str, Any]) -> None:
    data["models"].append({"name": "unused", "base_url": "http://x/v1", "model": "u"})


def _reorder_keys(data: dict[str, Any]) -> None:
    task = task0(data)
    data["task_types"][0] = dict(reversed(list(task.items())))


def test_config_hash_is_stable() -> None:
    # Given the same config parsed twice
    # When their snapshots are hashed
    # Then the hashes are equal, 16 hex digits
    first = _hash()
    assert first == _hash()
    assert len(first) == 16 and int(first, 16) >= 0


@pytest.mark.parametrize("mutate", [_add_other_task, _add_unused_model, _reorder_keys])
def test_config_hash_ignores_what_the_task_does_not_use(mutate: Callable[[dict[str, Any]], None]) -> None:
    # Given a change outside the task type and its models (or only in key order)
    # When the snapshot is hashed
    # Then the hash does not change
    assert _hash(mutate) == _hash()


@pytest.mark.parametrize(
    "mutate",
    [
        _set(("task_types", 0, "prompt"), "Invoice:\n{text}"),
        _set(("task_types", 0, "temperature"), 0.2),
        _set(("task_types", 0, "self_consistency", "min_agreement"), 0.66),
        _set(("task_types", 0, "tiers", 2), "large"),
        _set(("models", 0, "price", "input_per_mtok"), 0.16),
        _set(("models", 2, "model"), "big-two"),
    ],
)
def test_config_hash_changes_with_the_config(mutate: Callable[[dict[str, Any]], None]) -> None:
    # Given a change to the task type or to a model its tiers use
    # When the snapshot is hashed
    # Then the hash changes
    assert _hash(mutate) != _hash()


def test_snapshot_survives_its_json_round_trip() -> None:
    # Given a snapshot as a batch stores it (JSON)
    snap = _override_config()
    stored = snap.to_json()

    # When a worker reads it back
    again = TaskSnapshot.model_validate(stored)

    # Then it is the same snapshot with the same hash
    assert again == snap
    assert again.config_hash() == snap.config_hash()
    assert "schema" in stored["task_type"]


# --- settings ----------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("CASCADE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    # Given no CASCADE_* variable
    # When settings are loaded
    settings = load_settings()

    # Then no URL means the embedded stack, and the config path is ./cascade.yaml
    assert isinstance(settings, CascadeSettings)
    assert (settings.database_url, settings.broker_url) == (None, None)
    assert settings.config == Path("cascade.yaml")


def test_settings_come_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    # Given CASCADE_* variables
    clean_env.setenv("CASCADE_DATABASE_URL", "postgresql://env/db")
    clean_env.setenv("CASCADE_MAX_INLINE_WAIT_S", "2.5")
    clean_env.setenv("CASCADE_CONFIG", "/etc/cascade.yaml")

    # When settings are loaded
    settings = load_settings()

    # Then they are read and typed
    assert settings.database_url == "postgresql://env/db"
    assert settings.max_inline_wait_s == 2.5
    assert settings.config == Path("/etc/cascade.yaml")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"database_url": "postgresql://flag/db"}, "postgresql://flag/db"),  # a flag beats the env
        ({"database_url": None}, "postgresql://env/db"),  # an unset flag does not hide the env
        ({}, "postgresql://env/db"),
    ],
)
def test_explicit_overrides_win(clean_env: pytest.MonkeyPatch, override: dict[str, Any], expected: str) -> None:
    # Given CASCADE_DATABASE_URL in the environment
    clean_env.setenv("CASCADE_DATABASE_URL", "postgresql://env/db")

    # When settings are loaded with (or without) an explicit value
    settings = load_settings(**override)

    # Then an explicit value wins, and None means "not given"
    assert settings.database_url == expected


def test_bad_environment_value_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    # Given a CASCADE_* variable that does not parse
    clean_env.setenv("CASCADE_LEASE_S", "soon")

    # When settings are loaded
    with pytest.raises(ConfigError) as info:
        load_settings()

    # Then the error is cascade's, naming the field, not pydantic's ValidationError
    assert "lease_s" in str(info.value).lower()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CASCADE_HEARTBEAT_S": "10"}, "CASCADE_WORKER_DEAD_AFTER_S"),  # 15 s is under two beats of 10 s
        ({"CASCADE_LEASE_S": "12"}, "CASCADE_LEASE_S"),  # 12 s is under three beats of 5 s
    ],
)
def test_liveness_timings_that_would_take_live_work_away_are_refused(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    # Given a heartbeat too slow for the dead-after bound, or a lease too short to be renewed in time
    for name, value in env.items():
        clean_env.setenv(name, value)

    # When settings are loaded
    with pytest.raises(ConfigError) as info:
        load_settings()

    # Then the error names the variable to change and why
    assert info.value.path == variable and "heartbeat_s" in str(info.value)


def test_default_liveness_timings_recover_within_half_a_minute(clean_env: pytest.MonkeyPatch) -> None:
    # Given the defaults
    settings = load_settings()

    # Then a dead worker's running jobs are back within dead-after + one sweep, its reserved ones within the
    # stall timeout + one sweep: both under 30 s
    assert settings.worker_dead_after_s + settings.sweep_every_s <= 30
    assert settings.stalled_after_s + settings.sweep_every_s <= 30


# --- what real providers need ----------------------------------------------------------------------


def test_cached_prompt_tokens_are_priced_as_the_provider_bills_them() -> None:
    # Given a model whose cached prompt tokens cost half, as OpenAI bills gpt-4o-mini
    price = Price(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"),
                  cached_input_per_mtok=Decimal("0.075"))
    # When a 1,000-token prompt with 800 cached tokens gets 100 output tokens
    # Then 200 fresh tokens, 800 cached and 100 output are priced, exactly
    assert price.cost(1000, 100, cached_tokens=800) == Decimal("0.00015")
    assert Price(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60")).cost(1000, 100, 800) == \
        Decimal("0.00021")  # no cached price: cached tokens cost the input price
    assert price.cost(10, 0, cached_tokens=50) == Decimal("0.00000075")  # never more cached than prompt tokens


@pytest.mark.parametrize(
    ("task_temperature", "tier", "expected"),
    [
        (0.3, "small", 0.3),
        (None, "small", None),  # temperature: null on the task type: none is sent
        (0.3, {"model": "small", "temperature": None}, None),  # null on one tier only
        (0.3, {"model": "small", "temperature": 1.0}, 1.0),
        (0.3, {"model": "small"}, 0.3),
    ],
)
def test_temperature_null_sends_none_and_survives_the_snapshot(task_temperature: float | None, tier: Any,
                                                                expected: float | None) -> None:
    # Given a task type and its first tier with or without a temperature
    data = design()
    task0(data)["temperature"] = task_temperature
    task0(data)["tiers"] = [tier, "medium"]
    snap = parse_config(data, "cascade.yaml").snapshot("invoice_fields")
    # When the tier is resolved, directly and from the snapshot a batch stores
    stored = TaskSnapshot.model_validate(snap.to_json())
    # Then both give the expected temperature (None: the request carries none)
    assert snap.tier(1).temperature == expected
    assert stored.tier(1).temperature == expected
    assert stored.tier(2).temperature == task_temperature


def test_reasoning_model_options_and_config_error_policy() -> None:
    # Given a model that takes max_completion_tokens, and the defaults
    data = design()
    data["models"][0]["max_tokens_param"] = "max_completion_tokens"
    config = parse_config(data, "cascade.yaml")
    # Then the model says so, the others keep max_tokens, and a batch halts on a configuration fault by default
    assert config.model("small").max_tokens_param == "max_completion_tokens"
    assert config.model("medium").max_tokens_param == "max_tokens"
    assert config.task("invoice_fields").on_config_error == "halt"
    data["models"][1]["max_tokens_param"] = "max_output_tokens"
    assert "models[1].max_tokens_param" in str(config_error(data))


# --- fallbacks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fallbacks", "message"), [
    (["nope"], "unknown model 'nope'"),
    (["small"], "fallback 'small' is already in the tier"),
    (["medium", "medium"], "fallback 'medium' is already in the tier"),
])
def test_bad_fallbacks_name_the_field(fallbacks: list[str], message: str) -> None:
    # Given a tier whose fallbacks name an unknown model, the tier's own model, or one twice
    data = design()
    task0(data)["tiers"][0] = {"model": "small", "fallbacks": fallbacks}
    # When the config is loaded
    err = config_error(data)
    # Then the error names the file and the fallback's path
    assert message in str(err)
    assert err.path == f"task_types[0].tiers[0].fallbacks[{len(fallbacks) - 1}]"


def test_fallbacks_join_the_snapshot() -> None:
    # Given a tier with a fallback
    data = design()
    task0(data)["tiers"][0] = {"model": "small", "fallbacks": ["large"]}
    # When a batch's snapshot is taken
    snap = parse_config(data, "cascade.yaml").snapshot("invoice_fields")
    # Then the fallback's model is in it and the tier resolves to both, in order
    assert [m.name for m in snap.tier(1).chain] == ["small", "large"]
    assert "large" in snap.models
