"""`cascade report BATCH --html FILE` end to end: a batch with escalations, failures, cache hits, a budget and
audits; the figures in the file equal SQL over the batch, and a real headless Chromium draws every chart."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from html import unescape
from html.parser import HTMLParser

import pytest

from cascade.config import parse_config
from cascade.sim import SimConfig, SimModel
from tests.conftest import ROOT, wait_for
from tests.integration import scenario
from tests.integration.debian import find_or_install
from tests.integration.test_cli import _cli, _config_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: failures at every tier (invalid JSON, schema violations, too short) so that jobs escalate and some fail; a few
#: 500s so that a request is an error (few enough that 5 in a row never open small's circuit breaker for 30 s);
#: latencies so that the histogram has a spread
SIM = SimConfig(seed=7, models={
    "small": SimModel(p_correct=0.6, p_invalid_json=0.1, p_schema_violation=0.05, p_too_short=0.1, p_500=0.1,
                      latency_ms=5, latency_jitter_ms=10),
    "medium": SimModel(p_correct=0.7, p_invalid_json=0.1, p_too_short=0.05, latency_ms=20, latency_jitter_ms=20),
    "large": SimModel(p_correct=0.9, p_invalid_json=0.25, p_too_short=0.1, latency_ms=40, latency_jitter_ms=30),
})


def _config(sim_url):
    """The scenario's task types; ``label`` audits half of the answers accepted below its top tier."""
    data = scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)
    next(t for t in data["task_types"] if t["name"] == "label")["audit"] = {"rate": 0.5}
    return parse_config(data, "test.yaml")


def _batch(env, run, server):
    """A batch of 30 label rows, 10 of them answered before by another batch (cache hits), with a budget; run in
    this process until its jobs and its audits are done."""
    r = run(_config(server.url))
    first = r.submit(scenario.rows(10, "label"))
    r.drive(first)
    batch = r.client.submit("label", scenario.rows(30, "label"), key_field="id", max_cost="5").batch_id
    r.drive(batch)
    waiting = "SELECT count(*) FROM audits WHERE status IN ('queued', 'running')"
    wait_for(lambda: r.drive(batch) or env.scalar(waiting) == 0, 30, "the audits")
    return batch


class _Figures(HTMLParser):
    """What a report states: table cells and facts (their ``data-value``), and each chart's bar values."""

    def __init__(self):
        super().__init__()
        self.cells, self.facts, self.bars, self.charts = {}, {}, {}, []
        self._table = self._row = self._chart = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr":
            self._row = a.get("data-row")
        elif tag in ("td", "th") and "data-value" in a:
            self.cells[(self._table, self._row, a["data-col"])] = a["data-value"]
        elif tag == "span" and "data-value" in a:
            self.facts[a.get("data-fact") or a.get("data-status")] = a["data-value"]
        elif tag == "svg":
            self._chart = a["id"]
            self.charts.append(self._chart)
        elif tag == "rect" and self._chart and "data-value" in a and "height" in a:
            self.bars.setdefault(self._chart, []).append(a["data-value"])

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None


def _figures(html):
    parser = _Figures()
    parser.feed(html)
    return parser


def _report(env, tmp_path, batch, name="report.html"):
    out = tmp_path / name
    proc = _cli(env, _config_file(tmp_path, "http://127.0.0.1:9/v1"), "report", batch[:10], "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out.absolute())
    return out.read_text(encoding="utf-8")


def test_report_figures_equal_sql(env, sim, run, tmp_path):
    # Given a finished batch with escalations, failures, request errors, cache hits, a budget and audits
    batch = _batch(env, run, sim(SIM))
    status = dict(env.rows("SELECT status, count(*) FROM jobs WHERE batch_id = :b GROUP BY 1", b=batch))
    assert status.get("failed") and env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND tier > 1", b=batch)

    # When its report is written (the batch named by a prefix)
    html = _report(env, tmp_path, batch)
    fig = _figures(html)

    # Then the file is self-contained: nothing to fetch, nothing to run
    lowered = html.lower()
    for banned in ("<script", "<link", "src=", "url(", "@import", "http://", "https://", "<iframe", "<img"):
        assert banned not in lowered, banned
    # And the header's jobs by status and cost are the batch's
    assert {s: int(fig.facts[s]) for s in ("succeeded", "failed", "queued", "running")} == {
        s: status.get(s, 0) for s in ("succeeded", "failed", "queued", "running")}
    assert Decimal(fig.facts["cost"]) == env.scalar("SELECT sum(cost_usd) FROM jobs WHERE batch_id = :b", b=batch)
    # And cost by tier and model equals the attempts', in the table and in the chart's bars
    per_model = env.rows("""SELECT a.tier, a.model, count(*) AS n, sum(a.cost_usd) AS cost,
                                   count(*) FILTER (WHERE a.cached) AS cached, count(*) FILTER (WHERE a.error IS NOT NULL)
                                   AS errors
                            FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b
                            GROUP BY 1, 2 ORDER BY 1, 2""", b=batch)
    assert {r.tier for r in per_model} >= {0, 1, 2, 3} and any(r.errors for r in per_model)
    for r in per_model:
        key = f"{r.tier}|{r.model}"
        assert Decimal(fig.cells[("costs", key, "cost_usd")]) == r.cost
        assert [int(fig.cells[("costs", key, c)]) for c in ("requests", "cached", "errors")] == [r.n, r.cached, r.errors]
    assert [Decimal(v) for v in fig.bars["cost-chart"]] == [r.cost for r in per_model]
    # And escalation reasons per tier are escalation_reasons' counts over this batch's verdicts
    reasons = env.rows("""SELECT v.tier, r.reason ->> 'code' AS code, count(*) AS n
                          FROM validations v JOIN jobs j ON j.id = v.job_id
                          CROSS JOIN LATERAL jsonb_array_elements(v.reasons) AS r(reason)
                          WHERE j.batch_id = :b AND NOT v.passed GROUP BY 1, 2""", b=batch)
    assert len(reasons) >= 3
    got = {key: int(v) for (table, key, col), v in fig.cells.items() if table == "reasons"}
    assert got == {f"{r.tier}|{r.code}": r.n for r in reasons}
    for tier in {r.tier for r in reasons}:
        assert sorted(int(v) for v in fig.bars[f"reasons-chart-{tier}"]) == sorted(r.n for r in reasons if r.tier == tier)
    # And savings, rates and latency percentiles equal escalation_stats over the batch (`cascade stats --batch`)
    stats = json.loads(_cli(env, tmp_path / "cascade.yaml", "stats", "--batch", batch, "--json").stdout)[0]
    for col in ("finished", "escalation_rate", "tier3_rate", "avg_cost_usd", "baseline_cost_usd", "savings_pct"):
        assert Decimal(fig.cells[("summary", col, "value")]) == Decimal(str(stats[col])), col
    assert float(fig.facts["p50"]) == float(stats["p50_latency_ms"])
    assert Decimal(fig.facts["savings-pct"]) == Decimal(stats["savings_pct"]) > 0
    finished = "FROM jobs WHERE batch_id = :b AND status IN ('succeeded', 'failed')"
    assert Decimal(fig.facts["finished-cost"]) == env.scalar(f"SELECT sum(cost_usd) {finished}", b=batch)
    assert [Decimal(v) for v in fig.bars["savings-chart"]] == [Decimal(fig.facts["finished-cost"]),
                                                               Decimal(fig.facts["baseline-cost"])]
    # And the latency histogram counts every finished job once
    bins = [int(v) for (table, _, col), v in fig.cells.items() if table == "latency" and col == "jobs"]
    assert sum(bins) == sum(int(v) for v in fig.bars["latency-chart"]) == env.scalar(f"SELECT count(*) {finished}",
                                                                                       b=batch)
    # And cache hits, the budget and the audits' agreement are the batch's
    hits = "SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b AND a.cached"
    assert int(fig.facts["cache-hits"]) == env.scalar(hits, b=batch) > 0
    assert Decimal(fig.facts["budget-spent"]) == env.scalar("SELECT spent_usd FROM batches WHERE id = :b", b=batch)
    assert Decimal(fig.facts["budget-cap"]) == 5
    agreed = "SELECT count(*) FROM audits a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b AND a.agreed"
    assert int(fig.facts["audits-agreed"]) == env.scalar(agreed, b=batch)
    assert env.scalar("SELECT count(*) FROM audits a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b",
                      b=batch) > 0


def test_report_exit_codes(env, tmp_path):
    # Given a database without batches
    config = _config_file(tmp_path, "http://127.0.0.1:9/v1")
    # When the report names a folder that does not exist, a folder, or a batch that does not exist: exit 2
    missing = _cli(env, config, "report", "abc", "--html", str(tmp_path / "nowhere" / "r.html"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr, missing.stderr
    folder = _cli(env, config, "report", "abc", "--html", str(tmp_path))
    assert folder.returncode == 2 and "is a folder" in folder.stderr, folder.stderr
    unknown = _cli(env, config, "report", "abc", "--html", str(tmp_path / "r.html"))
    assert unknown.returncode == 2 and "no batch 'abc'" in unknown.stderr, unknown.stderr
    assert not (tmp_path / "r.html").exists()
    # And with the database down: exit 4, one line naming the host, never the password
    down = subprocess.run([sys.executable, "-m", "cascade.cli", "report", "abc", "--html", str(tmp_path / "r.html")],
                          check=False, cwd=ROOT, text=True, capture_output=True, timeout=60,
                          env=env.environ(CASCADE_DATABASE_URL="postgresql+psycopg://me:s3cret@127.0.0.1:9/db"))
    assert down.returncode == 4 and "127.0.0.1:9" in down.stderr and "s3cret" not in down.stderr, down.stderr
    # And --help says what the report holds
    help_ = _cli(env, config, "report", "--help")
    for word in ("HTML", "cost by tier and model", "escalation reasons", "latency", "savings"):
        assert word in " ".join(help_.stdout.split()), word


# --- the browser ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    """The path of a Chromium binary; the test is skipped, saying why, when there is none and none installs."""
    found, why = find_or_install("chromium", ["chromium", "chromium-browser"])
    if found is None:
        pytest.skip(f"no headless browser: {why}")
    return found


# Run in a copy of the report (the report itself runs nothing): each chart's box, its title's and its bars', in
# CSS pixels, written into the page for --dump-dom.
_PROBE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
const charts = [...document.querySelectorAll('svg.chart')].map(svg => ({
  id: svg.id, box: box(svg), title: box(svg.querySelector('text.title')),
  bars: [...svg.querySelectorAll('g.bars rect')].map(r => ({value: r.dataset.value, fill: r.getAttribute('fill'),
                                                          box: box(r)}))}));
const out = document.createElement('pre');
out.id = 'probe';
out.textContent = JSON.stringify({charts, height: document.documentElement.scrollHeight});
document.body.append(out);
</script>"""
_WIDTH = 1000


def _browse(chromium, profile, *args):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--force-device-scale-factor=1", f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _probe(chromium, tmp_path, html):
    """Where Chromium laid out each chart, its title and its bars."""
    csp = html[html.index('<meta http-equiv="Content-Security-Policy"'):]
    probe = html.replace(csp[: csp.index(">") + 1], "").replace("</body>", _PROBE + "</body>")
    path = tmp_path / "probe.html"
    path.write_text(probe, encoding="utf-8")
    dom = _browse(chromium, tmp_path / "profile", f"--window-size={_WIDTH},1000", "--dump-dom", path.as_uri())
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    return json.loads(unescape(dom[start: dom.index("</pre>", start)]))


def _rgb(color):
    return tuple(int(color[i: i + 2], 16) for i in (1, 3, 5))


def test_report_renders_in_headless_chromium(env, sim, run, tmp_path, chromium):
    # Given the report of a batch with escalations, failures, cache hits, a budget and audits
    html = _report(env, tmp_path, _batch(env, run, sim(SIM)))

    # When Chromium lays it out (a copy with a probe script) and takes a screenshot of the file itself
    layout = _probe(chromium, tmp_path, html)
    shot = tmp_path / "report.png"
    _browse(chromium, tmp_path / "profile", f"--window-size={_WIDTH},{layout['height'] + 200}",
            f"--screenshot={shot}", (tmp_path / "report.html").as_uri())

    # Then every chart is there, with a visible size and a title whose text has a width (a font drew it)
    charts = {c["id"]: c for c in layout["charts"]}
    assert {"savings-chart", "cost-chart", "outcome-chart", "reasons-chart-1", "latency-chart"} <= set(charts)
    from PIL import Image  # matplotlib's dependency, in the dev extra

    image = Image.open(shot).convert("RGB")
    for chart in charts.values():
        left, top, width, height = chart["box"]
        assert width >= 600 and height >= 60 and chart["title"][2] > 50, chart
        # And each bar with a value has a size, and the screenshot shows its colour where Chromium put it
        drawn = [b for b in chart["bars"] if float(b["value"]) > 0]
        assert drawn, chart["id"]
        for bar in drawn:
            x, y, w, h = bar["box"]
            assert w > 0 and h > 0, (chart["id"], bar)
            if w >= 3 and h >= 3:
                pixel = image.getpixel((int(x + w / 2), int(y + h / 2)))
                assert all(abs(p - q) <= 12 for p, q in zip(pixel, _rgb(bar["fill"]), strict=True)), (
                    chart["id"], bar, pixel)
        # And the chart's region is not blank: axes, labels and bars cover part of it
        region = image.crop((int(left), int(top), int(left + width), int(top + height)))
        inked = sum(region.convert("L").histogram()[:200])  # pixels darker than the grid lines
        assert inked > 0.01 * width * height, (chart["id"], inked)
