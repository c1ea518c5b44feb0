"""`cascade eval`'s command line without services: errors before anything starts."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from cascade import evaluation
from cascade.cli_eval import eval_command, plot_figure
from cascade.config import parse_config


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("eval")(eval_command)
    return app


def test_an_error_holding_rich_markup_is_printed_as_text(tmp_path: Path):
    # Given a config, and a task type name that looks like a closing rich markup tag
    config = tmp_path / "cascade.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "m", "base_url": "http://sim.invalid/v1", "model": "m"}],
        "task_types": [{"name": "qa", "prompt": "{q}", "tiers": ["m"]}]}))
    # When `cascade eval` is asked for it
    result = CliRunner().invoke(_cli(), ["eval", "qa[/x]", str(tmp_path / "rows.jsonl"), "--config", str(config),
                                         "--data-dir", str(tmp_path / "data")], env={"CASCADE_DATABASE_URL": "",
                                                                                    "CASCADE_BROKER_URL": ""})
    # Then the error names it verbatim and the exit code is 2, not a rich MarkupError
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2
    assert "unknown task type 'qa[/x]' (known: qa)" in result.output


def _report(tmp_path: Path) -> evaluation.TaskReport:
    config = parse_config({
        "models": [{"name": n, "base_url": "http://sim.invalid/v1", "model": n} for n in ("s", "m", "l")],
        "task_types": [{"name": "qa", "prompt": "{q}", "tiers": ["s", "m", "l"]}]}, "cascade.yaml")
    snap = config.snapshot("qa")

    def run(label: str, kind: str, tier: int | None, cost: str, accuracy: float) -> evaluation.RunReport:
        plan = evaluation.RunPlan("qa", label, kind, None if tier else Decimal("0.6"), tier, snap,  # type: ignore[arg-type]
                                  is_top=tier == 3)
        return evaluation.RunReport(plan, "b", evaluation.Metrics(40, 30, accuracy, 0.2, 0.1, Decimal(cost), None), [])

    runs = [run("τ=0.6", "threshold", None, "0.2", 0.8), run("s alone", "tier", 1, "0.05", 0.5),
            run("m alone", "tier", 2, "0.1", 0.7), run("l alone", "tier", 3, "1", 0.9)]
    per_tier = evaluation.per_tier_plan(snap, [Decimal("0.8"), Decimal("0.5")])
    runs.append(evaluation.RunReport(per_tier, "c", evaluation.Metrics(40, 33, 0.825, 0.3, 0.1, Decimal("0.3"), None),
                                     []))
    return evaluation.TaskReport("qa", str(tmp_path / "date.jsonl"), "e", runs)


def test_the_plot_has_a_title_and_a_marker_per_tier(tmp_path: Path):
    # Given a report with two cheaper tiers alone besides the top one
    fig = plot_figure([_report(tmp_path)])
    ax = fig.axes[0]
    # Then the title names the task type, the dataset and its rows
    assert ax.get_title() == "qa on date.jsonl: 40 rows"
    # And each tier alone has a marker of its own in the legend
    handles, labels = ax.get_legend_handles_labels()
    markers = {label: handle.get_marker() for handle, label in zip(handles, labels, strict=True)}
    tiers = [markers[f"qa: {n} alone"] for n in ("s", "m", "l")]
    assert len(set(tiers)) == 3 and tiers[2] == "*"
    # And a per-tier run is a point of its own, not on the line of the single thresholds
    assert markers["qa: per tier τ=(0.8, 0.5)"] not in {*tiers, "o"}
    assert len(ax.lines[0].get_xdata()) == 1
