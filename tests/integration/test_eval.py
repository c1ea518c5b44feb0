"""`cascade eval` end to end: hand-made recordings through the replay sim, real Celery workers and Postgres."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cascade import evaluation
from cascade.cli_eval import eval_command
from cascade.config import TaskSnapshot, load_config
from cascade.publish import CeleryPublisher
from cascade.sim import load_recordings

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": ["string", "number"]}}}
# USD per token: small 0.001 in / 0.002 out, large 0.01 / 0.02 (prices are per million tokens).
MODELS = [{"name": "small", "base_url": "http://replay.invalid/v1", "model": "s",
           "price": {"input_per_mtok": 1000, "output_per_mtok": 2000}},
          {"name": "large", "base_url": "http://replay.invalid/v1", "model": "l",
           "price": {"input_per_mtok": 10000, "output_per_mtok": 20000}}]
TASK = {"name": "qa", "prompt": "Question: {question}", "output": "json", "schema": SCHEMA,
        "self_consistency": {"samples": 3, "min_agreement": 0.6, "fields": ["answer"]},
        "tiers": ["small", {"model": "large", "samples": 1}], "max_tokens": 64}

# id: small's three samples, large's one sample, gold. None is an answer that fails the schema; "bad" is not JSON.
ROWS = {
    "r1": (["A", "A", "A"], "A", "A"),        # unanimous: tier 1 at both thresholds
    "r2": (["A", "A", "B"], "A", "A"),        # 2/3: passes 0.6, escalates at 1.0
    "r3": (["B", "B", "A"], "A", "A"),        # 2/3 wrong: accepted wrong at 0.6, fixed by tier 2 at 1.0
    "r4": (["A", "B", "C"], "A", "A"),        # no majority: tier 2
    "r5": ([18, 18.0, 17], 18, 18),           # 18 and 18.0 vote together: 2/3
    "r6": (["bad", "bad", "A"], "bad", "A"),  # 1/3, and tier 2 answers garbage: the job fails (wrong)
    "r7": (["A", "A", "A"], "A", "B"),        # confidently wrong at tier 1, so is tier 2
    "r8": ([None, None, None], "B", "B"),     # nothing valid: tier 2
}


def content(value: object) -> str:
    return "{not json" if value == "bad" else json.dumps({"answer": value})


def write_dataset(path: Path) -> Path:
    lines = []
    for rid, (small, large, gold) in ROWS.items():
        lines.append({"id": rid, "input": {"question": f"what is in box {rid}?"}, "gold": {"answer": gold},
                      "responses": {
                          "small": {"prompt_tokens": 100, "samples": [
                              {"content": content(v), "completion_tokens": 10} for v in small]},
                          "large": {"prompt_tokens": 200, "samples": [
                              {"content": content(large), "completion_tokens": 20}]}}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_config(path: Path, tasks: list[dict[str, object]] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"models": MODELS, "task_types": tasks or [TASK]}))
    return path


def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("eval")(eval_command)
    return app


def test_cascade_eval_reports_hand_computed_accuracy_escalation_and_cost(env, workers, tmp_path):
    # Given 8 hand-made rows, a two-tier task and a worker on the test's queues
    data, config = write_dataset(tmp_path / "qa.jsonl"), write_config(tmp_path / "cascade.yaml")
    workers(concurrency=32)
    # When `cascade eval` runs thresholds 0.6 and 1.0 (its own replay sim, the running worker)
    result = CliRunner().invoke(cli(), [
        "eval", "qa", str(data), "--thresholds", "0.6,1.0", "--json", "--no-start-worker", "--config", str(config),
        "--plot", str(tmp_path / "qa.png"), "--target-accuracy", "0.7", "--timeout", "60",
        "--data-dir", str(tmp_path / "data")], env=env.environ())
    # Then its numbers are the ones computed by hand:
    # a small call costs 100 × 0.001 + 3 × 10 × 0.002 = 0.16, a large one 200 × 0.01 + 20 × 0.02 = 2.40
    (report,) = json.loads(result.stdout)
    assert result.exit_code == (1 if report["target"]["threshold"] is None else 0), result.output
    runs = {r["label"]: r for r in report["runs"]}
    got = {label: (r["correct"], r["escalation_rate"], r["tier3_rate"], Decimal(r["cost_usd"]))
           for label, r in runs.items()}
    assert got == {
        "τ=0.6": (5, 3 / 8, 0.0, 8 * Decimal("0.16") + 3 * Decimal("2.4")),  # r1 r2 r5 at tier 1, r4 r8 at tier 2
        "τ=1.0": (6, 6 / 8, 0.0, 8 * Decimal("0.16") + 6 * Decimal("2.4")),  # r6 fails, r7 is wrong
        "tier 1 alone (small)": (3, 0.0, 0.0, 8 * Decimal("0.16")),  # r1 r2 r5; r4 r6 r8 fail the vote
        "top tier alone (large)": (6, 0.0, 0.0, 8 * Decimal("2.4")),
    }
    assert runs["τ=0.6"]["accuracy"] == 5 / 8
    assert runs["τ=0.6"]["relative_cost"] == pytest.approx(8.48 / 19.2)
    assert runs["τ=1.0"]["relative_cost"] == pytest.approx(15.68 / 19.2)
    assert runs["top tier alone (large)"]["relative_cost"] == 1.0
    assert report["target"]["target_accuracy"] == 0.7
    assert (tmp_path / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # And the runs and per-row outcomes are in Postgres beside the batches they ran as
    stored = env.rows("SELECT label, correct, cost_usd, (SELECT count(*) FROM eval_results e WHERE e.run_id = r.id) "
                      "FROM eval_runs r JOIN batches b ON b.id = r.batch_id")
    assert {label: (correct, cost, n) for label, correct, cost, n in stored} == {
        label: (v[0], v[3], 8) for label, v in got.items()}
    # r6 fails in every run; r4 and r8 also fail tier 1 alone
    assert env.scalar("SELECT count(*) FROM eval_results WHERE NOT correct AND status = 'failed'") == 4 + 2


def test_n_samples_in_one_call_and_separate_calls_give_the_same_votes_with_different_input_cost(
        env, sim, workers, tmp_path):
    # Given the same task twice: one model taking n=3 in one request, the other asked three times
    data = write_dataset(tmp_path / "qa.jsonl")
    recordings = load_recordings(data)
    one_call = load_config(write_config(tmp_path / "cascade.yaml")).snapshot("qa")
    separate = one_call.model_copy(update={
        "task_type": one_call.task_type.model_copy(update={"name": "qa_separate"}),
        "models": {**one_call.models, "small": one_call.models["small"].model_copy(update={"supports_n": False})}})
    server = sim(recordings=recordings)
    workers(concurrency=32)
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    pipe = evaluation.Pipeline(env.engine, publisher, server.url, settings)
    # When both run through the pipeline at threshold 0.6
    plans = [p for snap in (one_call, separate) for p in evaluation.plan_runs(snap, [Decimal("0.6")])]
    reports = evaluation.evaluate(pipe, plans, recordings, dataset=str(data), timeout=60)
    publisher.close()
    # Then every row gets the same votes and the same result
    assert reports is not None
    n_run, sep_run = (r.runs[0] for r in reports)
    votes = "SELECT j.key, v.tier, v.votes, v.passed FROM validations v JOIN jobs j ON j.id = v.job_id " \
            "WHERE j.batch_id = :b ORDER BY j.key, v.tier"
    assert env.rows(votes, b=n_run.batch_id) == env.rows(votes, b=sep_run.batch_id)
    assert [o.output for o in n_run.outcomes] == [o.output for o in sep_run.outcomes]
    assert n_run.metrics.correct == sep_run.metrics.correct == 5
    # And the prompt is billed once per row with n, three times without; output tokens are the same
    usage = "SELECT count(*), sum(a.input_tokens), sum(a.output_tokens) FROM attempts a JOIN jobs j ON j.id = a.job_id " \
            "WHERE j.batch_id = :b AND a.tier = 1"
    assert env.rows(usage, b=n_run.batch_id) == [(8, 8 * 100, 8 * 30)]
    assert env.rows(usage, b=sep_run.batch_id) == [(24, 24 * 100, 8 * 30)]
    assert sep_run.metrics.cost_usd - n_run.metrics.cost_usd == 8 * 2 * 100 * Decimal("0.001")


def _mixture() -> TaskSnapshot:
    variants = [{"name": "cot", "prompt": "Think: {question}", "samples": 2},
                {"name": "pot", "prompt": "Code: {question}", "samples": 2}]
    task = {**TASK, "name": "mix", "tiers": [{"model": "small", "variants": variants}, {"model": "large", "samples": 1}]}
    return TaskSnapshot.model_validate({
        "task_type": {**task, "schema": SCHEMA}, "models": {m["name"]: m for m in MODELS}})


def test_prompt_variants_are_voted_together_from_their_own_recorded_samples(env, sim, workers, tmp_path):
    # Given a tier voting two prompts (2 + 2 samples), each recorded with 4 samples of its own, where only the
    # first two of each agree
    lines = [{"id": "m1", "input": {"question": "box?"}, "gold": {"answer": "A"}, "responses": {
        "small#cot": {"prompt_tokens": 50, "samples": [{"content": content(v), "completion_tokens": 5}
                                                       for v in ("A", "A", "C", "C")]},
        "small#pot": {"prompt_tokens": 70, "samples": [{"content": content(v), "completion_tokens": 7}
                                                       for v in ("A", "A", "B", "B")]},
        "large": {"prompt_tokens": 200, "samples": [{"content": content("A"), "completion_tokens": 20}]}}}]
    (tmp_path / "mix.jsonl").write_text(json.dumps(lines[0]) + "\n")
    recordings = load_recordings(tmp_path / "mix.jsonl")
    server = sim(recordings=recordings)
    workers(concurrency=8)
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    pipe = evaluation.Pipeline(env.engine, publisher, server.url, settings)
    # When the mixture runs at threshold 1.0
    plans = evaluation.plan_runs(_mixture(), [Decimal("1.0")])
    reports = evaluation.evaluate(pipe, plans, recordings, dataset="mix", timeout=60)
    publisher.close()
    # Then all four samples agree (the first two of each variant), so tier 1 answers, with each prompt billed once
    assert reports is not None
    run = reports[0].runs[0]
    assert (run.metrics.correct, run.metrics.escalation_rate) == (1, 0.0)
    assert env.rows("SELECT a.variant, a.sample, a.n, a.input_tokens, a.output_tokens FROM attempts a "
                    "JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b ORDER BY a.sample", b=run.batch_id) == [
        ("cot", 0, 2, 50, 10), ("pot", 2, 2, 70, 14)]
    assert env.scalar("SELECT votes FROM validations v JOIN jobs j ON j.id = v.job_id WHERE j.batch_id = :b",
                      b=run.batch_id) == 4


# A medium tier between small and large for the per-tier search: three samples per row, 0.80 a call
# (100 × 0.005 + 3 × 10 × 0.01). Votes per row (gold as in ROWS):
#   small   r1 3 right, r2 2 right, r3 2 wrong, r4 1 right, r5 2 right, r6 1 right, r7 3 wrong, r8 none valid
#   medium  r1 3 right, r2 3 right, r3 2 right, r4 2 right, r5 3 right, r6 1 right, r7 2 right, r8 3 right
#   large   right on every row but r6 (not JSON: the job fails) and r7
MEDIUM = {"r1": ["A", "A", "A"], "r2": ["A", "A", "A"], "r3": ["A", "A", "B"], "r4": ["A", "A", "C"],
          "r5": [18, 18, 18], "r6": ["A", "B", "C"], "r7": ["B", "B", "A"], "r8": ["B", "B", "B"]}


def write_three_tiers(tmp_path: Path) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "qa3.jsonl")
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for line in lines:
        line["responses"]["medium"] = {"prompt_tokens": 100, "samples": [
            {"content": content(v), "completion_tokens": 10} for v in MEDIUM[line["id"]]]}
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    medium = {"name": "medium", "base_url": "http://replay.invalid/v1", "model": "m",
              "price": {"input_per_mtok": 5000, "output_per_mtok": 10000}}
    task = {**TASK, "tiers": ["small", "medium", {"model": "large", "samples": 1}]}
    config = tmp_path / "cascade3.yaml"
    config.write_text(yaml.safe_dump({"models": [*MODELS, medium], "task_types": [task]}))
    return data, config


def test_a_target_picks_thresholds_per_tier_confirms_them_and_prints_the_config_patch(env, workers, tmp_path):
    # Given three tiers, and no --thresholds: the single thresholds are 0.4, 0.6 and 0.8, and each tier is searched
    # on its vote levels 0.33, 0.66 and 1.0 (1, 2 or 3 votes of 3)
    data, config = write_three_tiers(tmp_path)
    workers(concurrency=32)
    args = ["eval", "qa", str(data), "--no-start-worker", "--config", str(config), "--timeout", "60",
            "--data-dir", str(tmp_path / "data")]
    # When the target is 95 % of the top tier alone's accuracy on half A (rows r1 r3 r4 r5; large gets all 4)
    result = CliRunner().invoke(cli(), [*args, "--target-relative", "0.95"], env=env.environ(COLUMNS="300"))
    # Then, by hand on half A, with costs small 0.16, medium 0.80, large 2.40 a row:
    #   τ1=0.33: every row passes small, r3 wrong: 3/4 for 0.64
    #   τ1=0.66: r4 (1 vote) goes on and passes medium (τ2 0.33 or 0.66, 3/4 for 1.44) or large (τ2 1.0, 3/4, 3.84)
    #   τ1=1.0:  r3 r4 r5 go to medium: 4/4 for 3.04 (τ2 0.33 or 0.66), or r3 r4 on to large: 4/4 for 7.84
    # so (1.0, 0.33) is chosen (the lower of two equals); the single thresholds are (0.66, 0.66) twice and
    # (1.0, 1.0), which is chosen (τ=0.8, 7.84). On half B it predicts 3/4 right for 3.04: r2 r8 right at
    # medium, r6 right at medium with 1 vote of 3 (medium alone failed it, so its answer is voted again from
    # the recorded samples), r7 accepted wrong at small; the confirming batch gives that on every row
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "target 0.95 × the top tier alone's accuracy on half A (1.000) = 0.9500" in out
    assert "per tier, predicted │ 1.0, 0.33 │ 1.000 │ 3.040000 │ 0.750 │ 3.040000 │ 0.317" in out
    assert "its batch matches the prediction on all 8 rows" in out
    assert "single threshold │ 0.8 │ 1.000 │ 7.840000 │ 0.500 │ 5.440000 │ 0.567" in out
    assert ("tiers: - {model: small, min_agreement: 1.0} - {model: medium, min_agreement: 0.33} "
            "- {model: large, samples: 1}") in out
    # And the confirming batch is a run in Postgres, labelled with its thresholds: 7 rows right (all but r7), 6 of
    # them answered at medium
    assert env.rows("SELECT threshold, correct, cost_usd FROM eval_runs WHERE label = 'per tier τ=(1.0, 0.33)'") == [
        (Decimal("1.0"), 7, 8 * Decimal("0.16") + 6 * Decimal("0.8"))]

    # When the target cannot be reached, searching 0.6 and 1.0 on each tier
    result = CliRunner().invoke(cli(), [*args, "--thresholds", "0.6,1.0", "--target-accuracy", "1.01", "--json"],
                                env=env.environ())
    # Then no combination is chosen and the exit code is 1
    assert result.exit_code == 1, result.output
    (report,) = json.loads(result.stdout)
    assert report["target"]["threshold"] is None and report["target"]["per_tier"]["thresholds"] is None
    assert report["target"]["per_tier"]["combinations"] == 4
