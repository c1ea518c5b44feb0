"""The HTML report's builders without services: escaping, empty batches, one tier, axes, accessible SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cascade.cli_report import report_command
from cascade.config import parse_config
from cascade.report import Bar, Chart, bar_chart, covering_ticks, histogram, inner_ticks, render_report
from cascade.store.report_data import (
    AuditGroup,
    BatchInfo,
    Histogram,
    JobGroup,
    ReportData,
    RequestGroup,
    TierVerdicts,
)

CREATED = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
NOW = CREATED + timedelta(minutes=5)


def _snapshot(task="label", models=("small",), cap=None):
    config = parse_config({
        "models": [{"name": m, "base_url": "http://sim.invalid/v1", "model": m,
                    "price": {"input_per_mtok": 1, "output_per_mtok": 2}} for m in models],
        "task_types": [{"name": task, "prompt": "{q}", "tiers": list(models)}]}, "test.yaml")
    return config.snapshot(task, max_cost_usd=cap).to_json()


def _data(*, task="label", models=("small",), cap=None, halted=None, source="rows.jsonl", jobs=(), requests=(),
          verdicts=(), audits=(), stats=None, latency=None):
    batch = BatchInfo("0123456789abcdef0123456789abcdef", task, sum(j.jobs for j in jobs), CREATED, "c0ffee",
                      source, len(models), halted, Decimal("0.5"), Decimal(0), Decimal(5), Decimal(15),
                      _snapshot(task, models, cap))
    return ReportData(batch, list(jobs), list(requests), list(verdicts), list(audits), stats or {},
                      latency or Histogram(0, 0, []))


def _one_tier(**kw):
    """One tier, three jobs (two succeeded, one failed), one rejected verdict, one latency bin."""
    return _data(
        jobs=[JobGroup(1, "default", 1, "succeeded", 2, Decimal("0.002"), CREATED + timedelta(seconds=3)),
              JobGroup(1, "default", 1, "failed", 1, Decimal("0.001"), CREATED + timedelta(seconds=4))],
        requests=[RequestGroup(1, "small", 3, 0, 1, 2, Decimal("0.003"), Decimal("0.001"), 30, 60, 120.0, 200.0)],
        verdicts=[TierVerdicts(1, 3, 1, [("invalid_json", 1)])],
        stats={"task_type": "label", "jobs": 3, "finished": 3, "succeeded": 2, "failed": 1,
               "escalation_rate": Decimal(0), "savings_pct": Decimal(40), "finished_cost_usd": Decimal("0.003"),
               "finished_baseline_usd": Decimal("0.005"), "p50_latency_ms": 1200.0, "p95_latency_ms": 1200.0},
        latency=Histogram(1200.0, 1200.0, [3]), **kw)


def _svgs(html):
    return re.findall(r"<svg\b.*?</svg>", html, flags=re.DOTALL)


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.labelled = set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "svg":
            self.labelled.append((a.get("role"), a.get("aria-labelledby", "")))


def test_every_user_string_is_escaped():
    # Given a batch whose task type, model, reason code, source and halt reason hold HTML
    evil = '<script>alert("x")</script>'
    model = '"><img src=x onerror=alert(1)>'
    data = _data(task="t<b>", models=(model,), halted=evil, source="a&b'c", jobs=[
        JobGroup(1, "route<i>", 1, "failed", 1, Decimal("0.1"), CREATED)],
        requests=[RequestGroup(1, model, 1, 0, 0, 1, Decimal("0.1"), Decimal(0), 1, 1, 5.0, 5.0)],
        verdicts=[TierVerdicts(1, 1, 1, [(evil, 1)])],
        audits=[AuditGroup(1, model, evil, 1, 0, 1, 0, Decimal("0.01"))])
    # When the report is rendered
    html = render_report(data, generated_at=NOW)
    # Then none of them is markup: no element the strings would open, and each is there escaped
    lowered = html.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<b>" not in lowered and "<i>" not in lowered
    for text in ("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
                 "t&lt;b&gt;", "a&amp;b&#x27;c", "route&lt;i&gt;"):
        assert text in html, text
    # And every chart is well-formed XML (an attribute value cannot break out of its quotes)
    for svg in _svgs(html):
        ET.fromstring(svg)


def test_an_empty_batch_says_so_instead_of_drawing():
    # Given a batch with no jobs, requests or verdicts yet
    html = render_report(_data(), generated_at=NOW)
    # Then there are no charts, and each section says what is missing
    assert _svgs(html) == []
    for text in ("No finished jobs yet", "No requests yet", "No jobs.", "No verdicts yet"):
        assert text in html, text
    assert 'id="audits"' not in html and "Budget" not in html and "Cache" not in html


def test_one_tier_draws_one_bar_per_chart_and_one_histogram_bin():
    # Given a one-tier batch whose finished jobs all took the same time
    html = render_report(_one_tier(cap=Decimal(2)), generated_at=NOW)
    charts = {re.search(r'id="([^"]+)"', svg).group(1): svg for svg in _svgs(html)}
    # Then each chart is there with its bars, and the histogram's one bin has a width
    assert set(charts) == {"savings-chart", "cost-chart", "outcome-chart", "reasons-chart-1", "latency-chart"}
    cost = ET.fromstring(charts["cost-chart"])
    rects = [r for r in cost.iter("rect") if "data-value" in r.attrib]
    assert [r.get("data-value") for r in rects] == ["0.003"]
    bins = [r for r in ET.fromstring(charts["latency-chart"]).iter("rect") if "data-value" in r.attrib]
    assert len(bins) == 1 and float(bins[0].get("width")) > 100 and bins[0].get("data-value") == "3"
    # And the header has the budget, the cache hits and the tier's model; the failed job's tier is stacked
    text = re.sub(r"<[^>]+>", "", html)
    assert "of $2.00" in text and "1 of 3 answered requests were hits" in text and "Tierssmall" in text
    assert len([r for r in ET.fromstring(charts["outcome-chart"]).iter("rect") if "data-value" in r.attrib]) == 2


def test_charts_are_labelled_for_screen_readers():
    # Given a report with every chart
    html = render_report(_one_tier(), generated_at=NOW)
    parser = _Ids()
    parser.feed(html)
    # Then each svg is an image named by its title and described by its desc, both present
    assert parser.labelled
    for role, labelled_by in parser.labelled:
        assert role == "img" and labelled_by.split() and set(labelled_by.split()) <= parser.ids
    assert html.count("<desc ") == len(parser.labelled) and 'lang="en"' in html


def test_the_page_forbids_fetching_and_scripts():
    html = render_report(_one_tier(), generated_at=NOW)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for banned in ("<script", "<link", "src=", "url(", "http://", "https://"):
        assert banned not in html


@pytest.mark.parametrize(("hi", "whole", "expected"), [
    (0, False, [0, 1]),
    (0.0041, False, [0, 0.001, 0.002, 0.003, 0.004, 0.005]),
    (12, True, [0, 5, 10, 15]),
    (3, True, [0, 1, 2, 3]),
    (0.4, True, [0, 1]),
    (37, True, [0, 10, 20, 30, 40]),
])
def test_covering_ticks_are_round_and_reach_the_top(hi, whole, expected):
    assert covering_ticks(hi, whole=whole) == expected


def test_inner_ticks_stay_inside():
    assert inner_ticks(570.9, 1474.9) == [600, 800, 1000, 1200, 1400]
    assert inner_ticks(-3, 3) == [-2, 0, 2]


def test_a_long_label_is_clipped_and_kept_whole_in_its_tooltip():
    label = "schema:/items/0/properties/very_long_field_name:enum"
    svg = bar_chart(Chart("c", "Why", "count", whole=True), [Bar(label, (3.0,), "3")])
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter("text")]
    assert any(t and t.endswith("…") and len(t) == 38 for t in texts)
    assert f"{label}: 3" in [t.text for t in root.iter("title")]


def test_empty_charts_are_a_sentence():
    assert bar_chart(Chart("c", "t", "a"), [], if_empty="Nothing <here>.") == '<p class="empty">Nothing &lt;here&gt;.</p>'
    assert histogram(Chart("h", "t", "a"), [], []).startswith('<p class="empty">')


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("report")(report_command)
    return app


def test_a_missing_folder_is_exit_2_before_the_database(tmp_path: Path):
    # Given no database at all
    env = {"CASCADE_DATABASE_URL": "", "CASCADE_BROKER_URL": ""}
    # When the report would go to a folder that does not exist, or to a folder
    missing = CliRunner().invoke(_cli(), ["report", "abc", "--html", str(tmp_path / "no" / "r.html")], env=env)
    folder = CliRunner().invoke(_cli(), ["report", "abc", "--html", str(tmp_path)], env=env)
    # Then both are exit 2, saying why
    assert missing.exit_code == 2 and "no such folder" in missing.output
    assert folder.exit_code == 2 and "is a folder" in folder.output


def test_help_says_what_the_report_holds():
    result = CliRunner().invoke(_cli(), ["report", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    for words in ("self-contained HTML", "cost by tier and model", "escalation reasons per tier", "latency",
                  "savings against the top tier", "cache hits, budget and audit agreement"):
        assert words in text, words
