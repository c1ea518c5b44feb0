"""Unit and property tests for cascade.validate: sample checks, canonical forms and voting."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.config import Length
from cascade.validate import Reason, Verdict, canonicalize, check_sample, model_error, vote

LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no"]},
        "score": {"type": "number"},
        "items": {"type": "array", "items": {"type": "integer"}},
        "a/b~c": {"type": "string"},
    },
    "required": ["label"],
}
DEFAULT = Length()


def codes(reasons: list[Reason] | tuple[Reason, ...]) -> list[str]:
    return [r.code for r in reasons]


# --- check_sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "output", "schema", "length", "expected_value", "expected_codes"),
    [
        ('{"label": "yes"}', "json", LABEL_SCHEMA, DEFAULT, {"label": "yes"}, []),
        ('  {"label": "no"}\n', "json", LABEL_SCHEMA, DEFAULT, {"label": "no"}, []),
        ('```json\n{"label": "yes"}\n```', "json", LABEL_SCHEMA, DEFAULT, {"label": "yes"}, []),
        ('```\n{"label": "yes"}\n```\n', "json", LABEL_SCHEMA, DEFAULT, {"label": "yes"}, []),
        ('```JSON\r\n[1, 2]\r\n```', "json", None, DEFAULT, [1, 2], []),
        ('```python\n{"label": "yes"}\n```', "json", None, DEFAULT, None, ["invalid_json"]),
        ('{"label": "yes"} trailing', "json", None, DEFAULT, None, ["invalid_json"]),
        ("", "json", None, DEFAULT, None, ["invalid_json"]),
        ("NaN", "json", None, DEFAULT, None, ["invalid_json"]),
        ("[Infinity]", "json", None, DEFAULT, None, ["invalid_json"]),
        ("1e999999", "json", None, DEFAULT, None, ["invalid_json"]),
        ("[" * 5000, "json", None, DEFAULT, None, ["invalid_json"]),
        ("[" * 150 + "]" * 150, "json", None, DEFAULT, None, ["invalid_json"]),
        ('{"label": "maybe"}', "json", LABEL_SCHEMA, DEFAULT, None, ["schema:/label:enum"]),
        ("{}", "json", LABEL_SCHEMA, DEFAULT, None, ["schema::required"]),
        ("[]", "json", LABEL_SCHEMA, DEFAULT, None, ["schema::type"]),
        ('{"label": "yes", "items": [1, "x"]}', "json", LABEL_SCHEMA, DEFAULT, None, ["schema:/items/1:type"]),
        ('{"label": "yes", "a/b~c": 3}', "json", LABEL_SCHEMA, DEFAULT, None, ["schema:/a~1b~0c:type"]),
        ('{"label": "yes"}', "json", LABEL_SCHEMA, Length(max_chars=5), None, ["too_long"]),
        ("not json at all", "json", LABEL_SCHEMA, Length(max_chars=5), None, ["too_long"]),
        ('{"label": "yes"}', "json", LABEL_SCHEMA, Length(min_chars=100), None, ["too_short"]),
        ("{}", "json", LABEL_SCHEMA, Length(min_chars=100), None, ["too_short", "schema::required"]),
        (None, "json", LABEL_SCHEMA, DEFAULT, None, ["too_short"]),
        (None, "text", None, DEFAULT, None, ["too_short"]),
        ("  hello\n", "text", None, DEFAULT, "  hello\n", []),
        ("{not json", "text", None, DEFAULT, "{not json", []),
        ("hi", "text", None, Length(min_chars=3), None, ["too_short"]),
        ("hello", "text", None, Length(max_chars=4), None, ["too_long"]),
        ("abcd", "text", None, Length(min_chars=4, max_chars=4), "abcd", []),
    ],
)
def test_check_sample(
    text: str | None,
    output: Any,
    schema: dict[str, Any] | None,
    length: Length,
    expected_value: Any,
    expected_codes: list[str],
) -> None:
    value, reasons = check_sample(text, output=output, schema=schema, length=length)
    assert codes(reasons) == expected_codes
    assert value == expected_value


def test_check_sample_details() -> None:
    # Given an answer outside the enum, a missing answer, and bad JSON
    _, enum = check_sample('{"label": "maybe"}', output="json", schema=LABEL_SCHEMA, length=DEFAULT)
    _, missing = check_sample(None, output="json", schema=None, length=DEFAULT)
    _, broken = check_sample("{", output="json", schema=None, length=DEFAULT)
    # Then the detail carries the human text and the code stays stable
    assert enum == [Reason("schema:/label:enum", "'maybe' is not one of ['yes', 'no']")]
    assert missing == [Reason("too_short", "no sample returned")]
    assert broken[0].code == "invalid_json" and "line 1 column 2" in broken[0].detail


def test_schema_detail_is_truncated() -> None:
    long_value = "x" * 1000
    _, reasons = check_sample(json.dumps({"label": long_value}), output="json", schema=LABEL_SCHEMA, length=DEFAULT)
    assert reasons[0].code == "schema:/label:enum"
    assert len(reasons[0].detail) <= 200


def test_reason_to_json() -> None:
    assert Reason("too_long", "9 chars").to_json() == {"code": "too_long", "detail": "9 chars"}
    assert Reason("inconsistent").to_json() == {"code": "inconsistent", "detail": ""}


def test_model_error() -> None:
    verdict = model_error("timeout", "read timed out after 30 s")
    assert verdict == Verdict(False, (Reason("model_error:timeout", "read timed out after 30 s"),), None, None, 0, 0)
    assert model_error("http_500", "boom", samples=3).samples == 3


# --- canonicalize ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (18, "18"),
        (18.0, "18"),
        (json.loads("1.8e1"), "18"),
        (Decimal("18.000"), "18"),
        (-0.0, "0"),
        (0.1, "0.1"),
        (1e-7, "1E-7"),
        (100, "100"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (Decimal("1e999999"), "1E+999999"),
        (10**40 + 1, str(10**40 + 1)),
        ({"b": 1, "a": [1.0, "X"]}, '{"a":[1,"X"],"b":1}'),
        ("  Yes \n", '"Yes"'),
        ({"a": " Yes "}, '{"a":" Yes "}'),
        ((1, 2), "[1,2]"),
    ],
)
def test_canonicalize(value: Any, expected: str) -> None:
    assert canonicalize(value) == expected


def test_canonicalize_keeps_bools_and_case_distinct() -> None:
    assert canonicalize(True) != canonicalize(1)
    assert canonicalize([False]) != canonicalize([0])
    assert canonicalize("Yes") != canonicalize("yes")


def test_canonicalize_large_ints_stay_distinct() -> None:
    # Decimal.normalize() would round both to 28 digits and make them equal
    assert canonicalize(10**30 + 1) != canonicalize(10**30 + 2)


@pytest.mark.parametrize(
    ("value", "fields", "expected"),
    [
        ({"label": "yes", "why": "because"}, ["label"], '{"label":"yes"}'),
        ({"why": "because"}, ["label"], '{"label":null}'),
        ({"b": 2, "a": 1, "c": 3}, ["c", "a"], '{"a":1,"c":3}'),
        ([1, 2], ["label"], "[1,2]"),
        (" yes ", ["label"], '"yes"'),
    ],
)
def test_canonicalize_fields(value: Any, fields: list[str], expected: str) -> None:
    assert canonicalize(value, fields) == expected


@pytest.mark.parametrize("value", [{1: "a"}, {"a": object()}, {1, 2}])
def test_canonicalize_rejects_non_json(value: Any) -> None:
    with pytest.raises(TypeError):
        canonicalize(value)


# --- vote -----------------------------------------------------------------------------------------


def run_vote(texts: list[str | None], samples: int | None = None, min_agreement: str = "0.5", **kw: Any) -> Verdict:
    kw.setdefault("output", "json")
    kw.setdefault("schema", None)
    kw.setdefault("length", DEFAULT)
    k = len(texts) if samples is None else samples
    return vote(texts, samples=k, min_agreement=Decimal(min_agreement), **kw)


@pytest.mark.parametrize(
    ("texts", "min_agreement", "passed", "votes"),
    [
        (['{"a": 1}', '{"a": 1}', '{"a": 2}'], "0.67", False, 2),
        (['{"a": 1}', '{"a": 1}', '{"a": 2}'], "0.66", True, 2),
        (['{"a": 1}', '{"a": 1}', '{"a": 2}'], "0.6", True, 2),
        (['{"a": 1}', '{"a": 1}', '{"a": 1}'], "1", True, 3),
        (['{"a": 1}', '{"a": 18}', '{"a": 18.0}'], "0.66", True, 2),
        (['{"a": 1, "b": 2}', '{ "b" : 2,\n "a": 1 }', "{}"], "0.66", True, 2),
        (['{"a": true}', '{"a": 1}', '{"a": 1.0}'], "0.66", True, 2),
        (['{"a": "Yes"}', '{"a": "yes"}', '{"a": "YES"}'], "0.34", False, 1),
        (['{"a": 1}', "oops", "oops"], "0.34", False, 1),
        (['{"a": 1}', "oops", "oops"], "0.33", True, 1),
    ],
)
def test_vote_threshold(texts: list[str | None], min_agreement: str, passed: bool, votes: int) -> None:
    verdict = run_vote(texts, min_agreement=min_agreement)
    assert (verdict.passed, verdict.votes, verdict.samples) == (passed, votes, 3)
    assert verdict.agreement == Decimal(votes) / 3
    assert codes(verdict.reasons)[:1] == ([] if passed else ["inconsistent"])


def test_vote_failure_reasons() -> None:
    # Given one valid answer, a missing sample and two kinds of invalid sample
    verdict = run_vote(['{"a": 1}', "{", '{"a": 2}', "[", None, "x" * 200], samples=7, length=Length(max_chars=100))
    # Then inconsistent comes first, then each failure code once with its first detail, in order
    assert codes(verdict.reasons) == ["inconsistent", "invalid_json", "too_short", "too_long"]
    assert verdict.reasons[0].detail == "1/7 samples agree, need 0.5"
    assert "line 1 column 2" in verdict.reasons[1].detail
    assert verdict.reasons[2].detail == "no sample returned"


def test_vote_tie_goes_to_the_earliest_first_vote() -> None:
    verdict = run_vote(['{"a": 2}', '{"a": 1}', '{"a": 1}', '{"a": 2}'], min_agreement="0.5")
    assert verdict.passed and verdict.result == {"a": 2} and verdict.votes == 2


def test_vote_missing_samples_count_in_k() -> None:
    # Given k = 3 but the provider returned only two agreeing samples
    verdict = run_vote(['{"a": 1}', '{"a": 1}'], samples=3, min_agreement="0.67")
    # Then the missing one counts as invalid: 2/3 < 0.67
    assert not verdict.passed
    assert codes(verdict.reasons) == ["inconsistent", "too_short"]
    assert verdict.agreement == Decimal(2) / 3


def test_vote_ignores_texts_beyond_k() -> None:
    verdict = run_vote(['{"a": 1}', '{"a": 2}', '{"a": 2}', '{"a": 2}'], samples=1)
    assert verdict.passed and verdict.result == {"a": 1} and verdict.samples == 1


@pytest.mark.parametrize(
    ("text", "passed", "result", "reason_codes"),
    [
        ('{"label": "yes"}', True, {"label": "yes"}, []),
        ('{"label": "maybe"}', False, None, ["schema:/label:enum"]),
        (None, False, None, ["too_short"]),
    ],
)
def test_vote_one_sample_is_no_vote(text: str | None, passed: bool, result: Any, reason_codes: list[str]) -> None:
    verdict = run_vote([text], samples=1, min_agreement="1", schema=LABEL_SCHEMA)
    assert (verdict.passed, verdict.result, codes(verdict.reasons)) == (passed, result, reason_codes)
    assert verdict.votes == (1 if passed else 0)


def test_vote_reports_the_majority_of_a_failed_split_vote() -> None:
    # Given three different answers and one broken sample (on_exhausted: accept_last is the policy's to apply)
    texts: list[str | None] = ["{", '{"a": 1}', '{"a": 2}', '{"a": 3}']
    verdict = run_vote(texts, min_agreement="1")
    # Then the vote fails, and still names its majority (the earliest of the tied answers) and its share
    assert not verdict.passed and verdict.result == {"a": 1} and verdict.votes == 1
    assert verdict.agreement == Decimal("0.25")


def test_vote_no_valid_sample_fails_even_at_zero_agreement() -> None:
    verdict = run_vote(["{", "["], min_agreement="0")
    assert not verdict.passed and verdict.votes == 0 and codes(verdict.reasons) == ["invalid_json"]


def test_vote_fields_projection_returns_the_full_output() -> None:
    # Given samples that agree on the label but not on the explanation
    texts: list[str | None] = [
        '{"label": "no", "why": "b"}',
        '{"label": "yes", "why": "a"}',
        '{"why": "c", "label": "yes"}',
    ]
    verdict = run_vote(texts, min_agreement="0.66", fields=["label"])
    # Then they agree, and the result is the first majority sample in full
    assert verdict.passed and verdict.votes == 2
    assert verdict.result == {"label": "yes", "why": "a"}


def test_vote_text_output_ignores_surrounding_whitespace() -> None:
    verdict = run_vote(["Paris\n", "  Paris", "paris"], min_agreement="0.66", output="text")
    assert verdict.passed and verdict.votes == 2 and verdict.result == "Paris\n"


def test_vote_fails_a_sample_cut_at_max_tokens_as_too_long() -> None:
    # Given a text answer cut off by the model's token limit: it reads as complete and passes unmarked
    assert run_vote(["Paris is the"], samples=1, min_agreement="1", output="text").passed
    # When it is marked truncated
    verdict = run_vote(["Paris is the"], samples=1, min_agreement="1", output="text", truncated={0})
    # Then it fails as too_long, saying why
    assert not verdict.passed and codes(verdict.reasons) == ["too_long"]
    assert "max_tokens" in verdict.reasons[0].detail
    # And among three samples a truncated one does not vote but counts in k
    texts: list[str | None] = ["Paris is the capital", "Paris is the", "Paris is the capital"]
    verdict = run_vote(texts, min_agreement="1", output="text", truncated={1})
    assert not verdict.passed and verdict.votes == 2 and codes(verdict.reasons) == ["inconsistent", "too_long"]
    assert run_vote(texts, min_agreement="0.66", output="text", truncated={1}).passed


def test_truncated_invalid_json_keeps_its_own_reason_and_indices_beyond_k_are_ignored() -> None:
    verdict = run_vote(['{"label": "ye', '{"label": "yes"}'], samples=2, min_agreement="1", truncated={0, 5})
    assert not verdict.passed and codes(verdict.reasons) == ["inconsistent", "invalid_json"]
    verdict = run_vote(['{"label": "yes"}'], samples=1, min_agreement="1", truncated={0})
    assert not verdict.passed and codes(verdict.reasons) == ["too_long"]


def test_vote_rejects_zero_samples() -> None:
    with pytest.raises(ValueError, match="samples must be at least 1"):
        run_vote([], samples=0)


# --- properties -----------------------------------------------------------------------------------

FAST = settings(max_examples=60, deadline=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


def reorder(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reorder(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(item) for item in value]
    return value


@FAST
@given(json_values)
def test_canonicalize_is_idempotent(value: Any) -> None:
    canonical = canonicalize(value)
    assert canonicalize(json.loads(canonical)) == canonical


@FAST
@given(json_values, st.sampled_from([None, 0, 2, "\t"]), st.booleans())
def test_canonicalize_ignores_key_order_and_whitespace(value: Any, indent: int | str | None, sort: bool) -> None:
    text = json.dumps(reorder(value), indent=indent, sort_keys=sort, separators=None if indent else (" , ", " : "))
    assert canonicalize(json.loads(text)) == canonicalize(value)


# A small pool, so that samples often agree, tie, or fail in different ways.
answers = st.sampled_from(['{"a": 1}', '{"a": 1.0, "b": null}', '{ "b": null, "a": 1 }', '{"a": 2}', "[1]", "{", None])
sample_lists = st.lists(answers, min_size=1, max_size=7)
agreements = st.decimals(min_value=0, max_value=1, places=2)


def parsed_samples(texts: list[str | None]) -> list[Any]:
    out = []
    for text in texts:
        value, reasons = check_sample(text, output="json", schema=None, length=DEFAULT)
        if not reasons:
            out.append(value)
    return out


@FAST
@given(st.data(), sample_lists, agreements)
def test_majority_share_does_not_depend_on_order(
    data: st.DataObject, texts: list[str | None], min_agreement: Decimal
) -> None:
    shuffled = data.draw(st.permutations(texts))
    first = run_vote(texts, min_agreement=str(min_agreement))
    second = run_vote(shuffled, min_agreement=str(min_agreement))
    assert (first.passed, first.votes, first.agreement) == (second.passed, second.votes, second.agreement)
    assert set(codes(first.reasons)) == set(codes(second.reasons))


@FAST
@given(sample_lists, st.integers(min_value=1, max_value=9), agreements)
def test_vote_result_comes_from_a_sample(texts: list[str | None], k: int, min_agreement: Decimal) -> None:
    verdict = run_vote(texts, samples=k, min_agreement=str(min_agreement))
    produced = parsed_samples(texts[:k])
    if verdict.result is None:
        assert produced == [] and not verdict.passed
    else:
        assert any(verdict.result == value and type(verdict.result) is type(value) for value in produced)
    assert (verdict.reasons == ()) == verdict.passed


@FAST
@given(json_values, st.integers(min_value=1, max_value=8), agreements)
def test_unanimous_valid_samples_pass(value: Any, k: int, min_agreement: Decimal) -> None:
    texts: list[str | None] = [json.dumps(reorder(value) if i % 2 else value, indent=i % 3) for i in range(k)]
    verdict = run_vote(texts, min_agreement=str(min_agreement))
    assert verdict.passed and verdict.votes == k and verdict.agreement == 1


@FAST
@given(sample_lists, agreements, agreements)
def test_raising_min_agreement_never_turns_failure_into_pass(
    texts: list[str | None], low: Decimal, high: Decimal
) -> None:
    low, high = sorted((low, high))
    if not run_vote(texts, min_agreement=str(low)).passed:
        assert not run_vote(texts, min_agreement=str(high)).passed
