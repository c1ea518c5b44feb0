"""`cascade eval`'s command line without services: errors before anything starts."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from cascade.cli_eval import eval_command


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
