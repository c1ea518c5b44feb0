"""The HTML report of one batch (``cascade report``): one static file whose charts are inline SVG drawn here.

Nothing is fetched when it opens: no scripts, fonts, stylesheets or images from elsewhere, and its
Content-Security-Policy forbids them. Every string that comes from users or models (task types, model names,
reason codes, sources, halt reasons) is escaped for HTML. Each chart has a title and a description for screen
readers and a table with its numbers beside it; a table cell's ``data-value`` holds the exact value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from cascade.charts import (
    PALETTE,
    STATUSES,
    Bar,
    Chart,
    bar_chart,
    covering_ticks,
    empty,
    esc,
    histogram,
    inner_ticks,
    money_tick,
    plain,
    tier_color,
)
from cascade.config import TaskSnapshot
from cascade.display import STATS_COLUMNS, latency, money, percent, rate
from cascade.store.report_data import ReportData, RequestGroup

__all__ = ["Bar", "Chart", "bar_chart", "covering_ticks", "esc", "histogram", "inner_ticks", "render_report"]

Cell = tuple[str, object]


def _table(ident: str, caption: str, columns: Sequence[tuple[str, str]],
           rows: Iterable[tuple[str, Sequence[Cell]]]) -> str:
    """Columns are (key, heading), rows (key, cells); the first cell heads its row. Cells name their column in
    ``data-col``, rows their key in ``data-row``."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for _, h in columns)
    body = []
    for key, cells in rows:
        tds = []
        for index, ((col, _), (shown, exact)) in enumerate(zip(columns, cells, strict=True)):
            tag, scope = ("th", ' scope="row"') if index == 0 else ("td", "")
            value = "" if exact is None else f' data-value="{esc(exact)}" class="num"'
            tds.append(f'<{tag}{scope} data-col="{esc(col)}"{value}>{esc(shown)}</{tag}>')
        body.append(f'<tr data-row="{esc(key)}">{"".join(tds)}</tr>')
    return (f'<table id="{esc(ident)}"><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _text(value: object) -> Cell:
    return str(value), None


def _n(value: int) -> Cell:
    return f"{value:,}", value


def _usd(value: object) -> Cell:
    return money(value), value


def _ms(value: float | None) -> Cell:
    return latency(value), value


# --- the page ----------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;color:#222;max-width:980px;margin:24px auto;padding:0 16px;line-height:1.45}
h1{font-size:1.5em;margin:0 0 .4em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.2em}dt{font-weight:600}dd{margin:0}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f4f4f4}svg.chart{max-width:100%;height:auto;display:block;margin:1em 0}
.note,.empty{color:#555}.halted{color:#b00}code{font-family:ui-monospace,monospace}
"""


def _snapshot(data: ReportData) -> TaskSnapshot | None:
    try:
        return TaskSnapshot.model_validate(data.batch.config)
    except ValueError:  # a snapshot this version cannot read: the report goes without tier names and cap
        return None


def _tier_label(tier: int, names: dict[int, str]) -> str:
    return "audit" if tier < 1 else f"tier {tier} · {names[tier]}" if tier in names else f"tier {tier}"


def _group_label(group: RequestGroup) -> str:
    return f"{'audit' if group.tier < 1 else f'tier {group.tier}'} · {group.model}"


def _span(value: object, shown: str, **attrs: str) -> str:
    extra = "".join(f' data-{k}="{esc(v)}"' for k, v in attrs.items())
    return f'<span{extra} data-value="{esc(value)}">{esc(shown)}</span>'


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _counts(data: ReportData) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for group in data.jobs:
        counts[group.status] = counts.get(group.status, 0) + group.jobs
    return counts


def _facts(data: ReportData, snap: TaskSnapshot | None, names: dict[int, str]) -> list[tuple[str, str]]:
    """The header's facts as (term, HTML)."""
    b, counts = data.batch, _counts(data)
    cost = sum((g.cost_usd for g in data.jobs), Decimal(0))
    facts = [("Batch", f"<code>{esc(b.batch_id)}</code>"), ("Task type", esc(b.task_type)), ("Rows", f"{b.rows:,}"),
             ("Jobs", ", ".join(_span(n, f"{n:,} {s}", status=s) for s, n in counts.items())),
             ("Cost", _span(cost, money(cost), fact="cost") + " (the jobs' requests)")]
    if names:
        facts.append(("Tiers", esc(" → ".join(names[t] for t in sorted(names)))))
    starts: dict[tuple[int, str], int] = {}
    for g in data.jobs:
        starts[(g.start_tier, g.route)] = starts.get((g.start_tier, g.route), 0) + g.jobs
    if any(route != "default" for _, route in starts):
        facts.append(("Started", esc(", ".join(f"{n:,} at tier {t} ({r})" for (t, r), n in sorted(starts.items())))))
    facts.append(("Created", esc(_when(b.created_at))))
    last = max((g.last_finished_at for g in data.jobs if g.last_finished_at), default=None)
    if last is not None and counts["queued"] + counts["running"] == 0:
        facts.append(("Finished", esc(f"{_when(last)}, {_duration((last - b.created_at).total_seconds())} after")))
    facts += [("Config hash", f"<code>{esc(b.config_hash)}</code>")] + ([("Source", esc(b.source))] if b.source else [])
    if b.halted:
        facts.append(("Halted", f'<span class="halted">{esc(b.halted)}</span>'))
    return facts + _extras(data, snap)


def _extras(data: ReportData, snap: TaskSnapshot | None) -> list[tuple[str, str]]:
    """Cache hits, budget and audit agreement, where the batch has them."""
    facts = []
    hits, sent = sum(g.cached for g in data.requests), sum(g.answered for g in data.requests)
    if hits:
        saved = sum((g.saved_usd for g in data.requests), Decimal(0))
        facts.append(("Cache", _span(hits, f"{hits:,}", fact="cache-hits") + f" of {hits + sent:,} answered requests "
                      f"were hits, saving {_span(saved, money(saved), fact='cache-saved')}"))
    cap = snap.max_cost_usd if snap else None
    if cap is not None:
        b = data.batch
        left = cap - b.spent_usd - b.reserved_usd
        facts.append(("Budget", (f"{_span(b.spent_usd, money(b.spent_usd), fact='budget-spent')} spent, "
                                 f"{esc(money(b.reserved_usd))} reserved, {esc(money(left))} left of "
                                 f"{_span(cap, money(cap), fact='budget-cap')}")))
    if data.audits:
        agreed, disagreed = sum(a.agreed for a in data.audits), sum(a.disagreed for a in data.audits)
        waiting, cost = sum(a.waiting for a in data.audits), sum((a.cost_usd for a in data.audits), Decimal(0))
        share = f" ({rate(Decimal(agreed) / (agreed + disagreed))})" if agreed + disagreed else ""
        facts.append(("Audits", (f"{_span(agreed, f'{agreed:,}', fact='audits-agreed')} agreed{esc(share)}, "
                                 f"{disagreed:,} disagreed, {waiting:,} waiting; they cost {esc(money(cost))} (not in "
                                 "the jobs' cost)")))
    return facts


def _header(data: ReportData, snap: TaskSnapshot | None, names: dict[int, str], generated_at: datetime) -> str:
    items = "".join(f"<dt>{esc(term)}</dt><dd>{html}</dd>" for term, html in _facts(data, snap, names))
    return (f"<header><h1>Batch {esc(data.batch.batch_id[:8])} · {esc(data.batch.task_type)}</h1><dl>{items}</dl>"
            f'<p class="note">Report generated {esc(_when(generated_at))}.</p></header>')


def _savings(data: ReportData, names: dict[int, str]) -> str:
    st, b = data.stats, data.batch
    head = '<section id="savings"><h2>Savings against the top tier</h2>'
    if not st.get("finished"):
        return head + empty("No finished jobs yet: savings are counted over finished jobs.") + "</section>"
    cost, base, saved = st["finished_cost_usd"], st["finished_baseline_usd"], st["savings_pct"]
    top = f"tier {b.tiers}" + (f", {names[b.tiers]}" if b.tiers in names else "")
    text = (f"<p>The {st['finished']:,} finished jobs cost {_span(cost, money(cost), fact='finished-cost')}; the top "
            f"tier alone ({esc(top)}) would have cost {_span(base, money(base), fact='baseline-cost')}: "
            f"<strong>{_span(saved, percent(saved), fact='savings-pct')} saved</strong>.</p>")
    chart = bar_chart(Chart("savings-chart", "Cost of the finished jobs against the top tier alone", "cost (USD)",
                            money_tick), [Bar("this batch", (float(cost),), money(cost), PALETTE[0], str(cost)),
                                           Bar("top tier alone", (float(base),), money(base), PALETTE[3], str(base))])
    rows = [(col, (_text(col), (show(st.get(col)), st.get(col)))) for col, show in STATS_COLUMNS.items()]
    note = (f'<p class="note">The baseline prices each finished job\'s start-tier tokens at the top tier\'s prices '
            f"({esc(money(b.top_input_per_mtok))} in, {esc(money(b.top_output_per_mtok))} out per million tokens), as "
            "escalation_stats does; audit requests count in neither.</p>")
    return head + text + chart + note + _table("summary", "This batch in escalation_stats' columns",
                                               [("column", "column"), ("value", "value")], rows) + "</section>"


def _costs(data: ReportData) -> str:
    bars = [Bar(_group_label(g), (float(g.cost_usd),), money(g.cost_usd), tier_color(g.tier), str(g.cost_usd))
            for g in data.requests]
    chart = bar_chart(Chart("cost-chart", "Cost by tier and model", "cost (USD)", money_tick), bars,
                      if_empty="No requests yet.")
    columns = [("model", "tier · model"), ("requests", "requests"), ("errors", "errors"), ("cached", "cache hits"),
               ("input_tokens", "input tokens"), ("output_tokens", "output tokens"), ("cost_usd", "cost"),
               ("p50_latency_ms", "p50 latency"), ("p95_latency_ms", "p95 latency")]
    rows = [(f"{g.tier}|{g.model}", [_text(_group_label(g)), _n(g.requests), _n(g.errors), _n(g.cached),
                                     _n(g.input_tokens), _n(g.output_tokens), _usd(g.cost_usd), _ms(g.p50_latency_ms),
                                     _ms(g.p95_latency_ms)]) for g in data.requests]
    note = ('<p class="note">Every request of the batch, retries included; audit requests are at tier 0, outside the '
            "jobs' cost. Latencies are those of the requests sent (cache hits left out).</p>")
    return ('<section id="costs"><h2>Cost by tier and model</h2>' + chart + note
            + (_table("costs", "Requests by tier and model", columns, rows) if rows else "") + "</section>")


def _outcomes(data: ReportData, names: dict[int, str]) -> str:
    tiers: dict[int, dict[str, int]] = {}
    for g in data.jobs:
        tiers.setdefault(g.tier, dict.fromkeys(STATUSES, 0))[g.status] += g.jobs
    present = tuple(s for s in STATUSES if any(c[s] for c in tiers.values()))
    bars = [Bar(_tier_label(t, names), tuple(float(c[s]) for s in present), f"{sum(c.values()):,} jobs")
            for t, c in sorted(tiers.items())]
    chart = bar_chart(Chart("outcome-chart", "Jobs by the tier they are at or ended at", "jobs", whole=True,
                            series=present, colors=tuple(STATUSES[s] for s in present)), bars, if_empty="No jobs.")
    rows = [(str(t), [_text(_tier_label(t, names)), *[_n(c[s]) for s in STATUSES]]) for t, c in sorted(tiers.items())]
    return ('<section id="outcomes"><h2>Where jobs ended</h2>' + chart
            + (_table("outcomes", "Jobs by tier and status", [("tier", "tier"), *[(s, s) for s in STATUSES]], rows)
               if rows else "") + "</section>")


def _reasons(data: ReportData, names: dict[int, str]) -> str:
    parts, rows = [], []
    for v in data.verdicts:
        label = _tier_label(v.tier, names)
        bars = [Bar(code or "other codes", (float(n),), f"{n:,}", tier_color(v.tier)) for code, n in v.reasons]
        parts.append(f"<h3>{esc(label)}</h3><p>{v.verdicts:,} verdicts, {v.rejected:,} rejected "
                     f"({esc(rate(Decimal(v.rejected) / v.verdicts if v.verdicts else None))}).</p>"
                     + bar_chart(Chart(f"reasons-chart-{v.tier}", f"Why {label} rejected answers",
                                       "rejected answers with this reason", whole=True), bars,
                                 if_empty="No answer was rejected at this tier."))
        rows += [(f"{v.tier}|{code or ''}", [_text(label), _text(code or "other codes"), _n(n)]) for code, n in v.reasons]
    note = ('<p class="note">Reason codes of the rejected verdicts (a verdict may have several); the 8 most frequent '
            "per tier, the rest together.</p>")
    table = _table("reasons", "Rejected answers by tier and reason", [("tier", "tier"), ("code", "reason"),
                                                                       ("count", "count")], rows) if rows else ""
    body = "".join(parts) if parts else empty("No verdicts yet.")
    return f'<section id="reasons"><h2>Escalation reasons per tier</h2>{note}{body}{table}</section>'


def _latencies(data: ReportData) -> str:
    hist, st = data.latency, data.stats
    seconds = hist.hi >= 2000
    unit = "s" if seconds else "ms"

    def tick(v: float) -> str:
        return plain(round(v / 1000, 3) if seconds else round(v))

    chart = histogram(Chart("latency-chart", "Latency per job, first request to finished", f"latency ({unit})", tick),
                      hist.edges(), hist.counts, if_empty="No finished jobs yet.")
    head = '<section id="latency"><h2>Latency</h2>'
    if not hist.counts:
        return head + chart + "</section>"
    edges = hist.edges()
    p50, p95 = st["p50_latency_ms"], st["p95_latency_ms"]
    text = (f"<p>{sum(hist.counts):,} finished jobs: median {_span(p50, latency(p50), fact='p50')}, 95th percentile "
            f"{_span(p95, latency(p95), fact='p95')}.</p>")
    rows = [(str(i), [_text(i + 1), _ms(edges[i]), _ms(edges[i + 1]), _n(n)]) for i, n in enumerate(hist.counts)]
    table = _table("latency", "Jobs per latency bin", [("bin", "bin"), ("from_ms", "from"), ("to_ms", "to"),
                                                       ("jobs", "jobs")], rows)
    return head + text + chart + f"<details><summary>The bins</summary>{table}</details></section>"


def _audits(data: ReportData) -> str:
    if not data.audits:
        return ""
    columns = [("model", "tier · model"), ("auditor", "auditor"), ("audits", "audits"), ("agreed", "agreed"),
               ("disagreed", "disagreed"), ("agreement", "agreement"), ("waiting", "waiting"), ("cost_usd", "cost")]
    rows = []
    for a in data.audits:
        done = a.agreed + a.disagreed
        agreement = Decimal(a.agreed) / done if done else None
        rows.append((f"{a.tier}|{a.model}", [_text(f"tier {a.tier} · {a.model}"), _text(a.auditor_model),
                                             _n(a.audits), _n(a.agreed), _n(a.disagreed), (rate(agreement), agreement),
                                             _n(a.waiting), _usd(a.cost_usd)]))
    return ('<section id="audits"><h2>Audit agreement</h2><p class="note">Answers accepted below the top tier, re-run '
            "on the auditor model: how often the two agree on the voted fields.</p>"
            + _table("audits", "Audits by the tier and model whose answer was audited", columns, rows) + "</section>")


def render_report(data: ReportData, *, generated_at: datetime) -> str:
    """The report's whole HTML page: a header (task type, rows, jobs by status, cost, created, config hash, cache
    hits, budget, audit agreement), savings against the top tier, cost by tier and model, where jobs ended,
    escalation reasons per tier, a job latency histogram and, when the batch has audits, their agreement."""
    snap = _snapshot(data)
    names = {i: snap.tier(i).model.name for i in range(1, snap.tier_count + 1)} if snap else {}
    body = [_header(data, snap, names, generated_at), "<main>", _savings(data, names), _costs(data),
            _outcomes(data, names), _reasons(data, names), _latencies(data), _audits(data), "</main>"]
    title = f"cascade report: batch {data.batch.batch_id} ({data.batch.task_type})"
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")
