"""The pure parts of `cascade metrics`: tallies' sums, the watermark's target, metric families, the HTTP app."""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cascade.cli_metrics import metrics_app
from cascade.errors import ServiceUnreachable
from cascade.metrics import CascadeCollector, Figures, Mark, add_sums, families, fold_target
from cascade.store.metrics import BatchBudget, JobCounts

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def _mark(at, writers=(), ids=1):
    return Mark(at, {"attempts": ids}, frozenset(writers))


def test_add_sums_adds_key_by_key_and_leaves_its_inputs_alone():
    # Given two tallies' sums sharing one key
    a = {("t", "m"): (1, Decimal("0.5")), ("t", "n"): (2, Decimal(0))}
    b = {("t", "m"): (3, Decimal("0.25")), ("u", "m"): (1, Decimal(1))}
    # When they are added
    total = add_sums(a, b)
    # Then shared keys add up element by element, the others are kept, and neither input changed
    assert total == {("t", "m"): (4, Decimal("0.75")), ("t", "n"): (2, Decimal(0)), ("u", "m"): (1, Decimal(1))}
    assert a == {("t", "m"): (1, Decimal("0.5")), ("t", "n"): (2, Decimal(0))}


@pytest.mark.parametrize(
    ("marks", "running", "expected"),
    [
        ([], frozenset(), None),  # nothing seen yet
        ([_mark(1.0, ids=10)], frozenset(), 10),  # its writers (none) have ended
        ([_mark(1.0, ["3/7"], 10)], frozenset({"3/7"}), None),  # a writer of then is still running
        ([_mark(1.0, ["3/7"], 10)], frozenset({"4/1"}), 10),  # another transaction runs now: no matter
        # the newest clear mark wins; an older one whose writer still runs would also block the newer one
        # (it was running at the newer mark too), so the newest clear one is the furthest safe point
        ([_mark(1.0, [], 10), _mark(2.0, ["3/7"], 20), _mark(3.0, [], 30)], frozenset({"3/7"}), 30),
        ([_mark(1.0, [], 10), _mark(2.0, ["3/7"], 20)], frozenset({"3/7"}), 10),
    ],
)
def test_fold_target_is_the_newest_mark_whose_writers_have_all_ended(marks, running, expected):
    # Given marks taken at successive reads and the transactions running before a new snapshot
    # When the watermark's target is chosen
    target = fold_target(marks, running)
    # Then it is the newest mark none of whose writers still runs (or none)
    assert (target.max_ids["attempts"] if target else None) == expected


def _figures(**kw):
    values = {
        "jobs": {"label": JobCounts({"queued": 2, "running": 1, "succeeded": 5, "failed": 1}, Decimal("0.75"))},
        "tiers": {"label": 3},
        # (task type, model, error, cached) -> (requests, cost, saved, input tokens, output tokens)
        "attempts": {("label", "small", "", False): (6, Decimal("0.5"), Decimal(0), 100, 10),
                     ("label", "small", "", True): (2, Decimal(0), Decimal("0.2"), 30, 3),
                     ("label", "small", "timeout", False): (1, Decimal(0), Decimal(0), 0, 0),
                     ("label", "big", "in_flight", False): (1, Decimal(0), Decimal(0), 0, 0),
                     ("label", "big", "", False): (3, Decimal("0.25"), Decimal(0), 50, 5)},
        # (task type, tier, passed, escalated) -> (verdicts,)
        "validations": {("label", 1, False, True): (3,), ("label", 1, True, False): (4,),
                        ("label", 2, True, False): (3,), ("label", 2, False, False): (1,)},
        # (task type, tier, model, status, agreed) -> (audits, cost)
        "audits": {("label", 1, "small", "done", True): (3, Decimal("0.03")),
                   ("label", 1, "small", "done", False): (1, Decimal("0.01")),
                   ("label", 1, "small", "done", None): (1, Decimal("0.01")),
                   ("label", 1, "small", "queued", None): (2, Decimal(0))},
        "daily_budgets": {"label": (Decimal("1.5"), Decimal("0.1"))},
        "daily_caps": {"label": Decimal(50)},
        "queues": {"tier1": 4, "validate": 0},
        "read_s": 0.01,
    }
    return Figures(**{**values, **kw})


def _samples(metrics):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def test_families_turn_figures_into_the_documented_metrics():
    # Given one scrape's figures
    # When they are turned into metric families
    got = _samples(families(_figures()))

    def value(name, **labels):
        return got[(name, tuple(sorted(labels.items())))]

    # Then jobs per status (gauge) and jobs submitted (counter) are per task type
    assert value("cascade_jobs", task_type="label", status="queued") == 2
    assert value("cascade_jobs_submitted_total", task_type="label") == 9
    assert value("cascade_cost_usd_total", task_type="label") == 0.75
    # And verdicts per tier; escalations are counted into the tier above the verdicts whose job moved up, with
    # every tier of the task type present (a rejection at the last tier escalates nowhere)
    assert value("cascade_verdicts_total", task_type="label", tier="1", verdict="rejected") == 3
    assert value("cascade_verdicts_total", task_type="label", tier="2", verdict="passed") == 3
    assert value("cascade_escalations_total", task_type="label", tier="2") == 3
    assert value("cascade_escalations_total", task_type="label", tier="3") == 0
    # And requests exclude cache hits and requests in flight; error "none" is an answer
    assert value("cascade_model_requests_total", model="small", error="none") == 6
    assert value("cascade_model_requests_total", model="small", error="timeout") == 1
    assert ("cascade_model_requests_total", (("error", "in_flight"), ("model", "big"))) not in got
    assert value("cascade_model_requests_in_flight", model="big") == 1
    assert value("cascade_model_cost_usd_total", model="big") == 0.25
    assert value("cascade_model_tokens_total", model="small", direction="input") == 100
    # And the cache's hits, misses (answered requests sent) and saved cost are per task type
    assert value("cascade_cache_hits_total", task_type="label") == 2
    assert value("cascade_cache_misses_total", task_type="label") == 9
    assert value("cascade_cache_saved_usd_total", task_type="label") == pytest.approx(0.2)
    # And audits: per status, and verdicts (an audit without one counts in neither audited nor agreed)
    assert value("cascade_audits", task_type="label", status="queued") == 2
    assert value("cascade_audits", task_type="label", status="running") == 0
    assert value("cascade_audited_total", task_type="label", tier="1", model="small") == 4
    assert value("cascade_audit_agreed_total", task_type="label", tier="1", model="small") == 3
    assert value("cascade_audit_cost_usd_total", task_type="label") == pytest.approx(0.05)
    # And budgets, queues and the scrape itself
    assert value("cascade_task_budget_spent_usd", task_type="label") == 1.5
    assert value("cascade_task_budget_per_day_usd", task_type="label") == 50
    assert value("cascade_queue_messages", queue="tier1") == 4
    assert value("cascade_broker_up") == 1


def test_a_broker_that_did_not_answer_leaves_queues_out_and_says_so():
    got = _samples(families(_figures(queues=None)))
    assert got[("cascade_broker_up", ())] == 0
    assert not [k for k in got if k[0] == "cascade_queue_messages"]


def test_counters_never_go_down_while_the_process_runs():
    # Given a collector that showed a cost and a count
    collector = CascadeCollector(engine=None)
    first = collector._monotone(families(_figures()))
    assert _samples(first)[("cascade_cost_usd_total", (("task_type", "label"),))] == 0.75
    # When a later scrape reads a lower cost (an estimate replaced by the real, lower cost) and a higher count
    lower = _figures(jobs={"label": JobCounts({"queued": 0, "running": 0, "succeeded": 9, "failed": 1},
                                             Decimal("0.70"))})
    second = _samples(collector._monotone(families(lower)))
    # Then the counter keeps its last value, grows where the ledger grew, and gauges show what was read
    assert second[("cascade_cost_usd_total", (("task_type", "label"),))] == 0.75
    assert second[("cascade_jobs_submitted_total", (("task_type", "label"),))] == 10
    assert second[("cascade_jobs", (("status", "queued"), ("task_type", "label")))] == 0


class _Fixed:
    def __init__(self, figures=None, error=None):
        self.figures, self.error = figures, error

    def collect(self):
        if self.error:
            raise self.error
        return families(self.figures)


def _get(app, path):
    status = []
    body = b"".join(app({"PATH_INFO": path, "HTTP_ACCEPT": "text/plain", "wsgi.input": io.BytesIO()},
                        lambda s, headers: status.append((s, dict(headers)))))
    return status[0][0], status[0][1]["Content-Type"], body.decode()


def test_the_app_serves_metrics_and_answers_500_with_one_line_when_the_database_fails():
    # Given a registry whose collector reads fine, and one whose database does not answer
    good, bad = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    good.register(_Fixed(_figures()))
    bad.register(_Fixed(error=ServiceUnreachable("database", host="db:5432", detail="connection refused")))
    # When /metrics is asked of each
    status, content_type, body = _get(metrics_app(good), "/metrics")
    # Then the good one answers the text format, which parses
    assert status == "200 OK" and content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"cascade_jobs", "cascade_escalations", "cascade_verdicts", "cascade_model_requests",
            "cascade_queue_messages"} <= names
    # And the failing one answers 500 with one line naming the database's host and why
    status, _, body = _get(metrics_app(bad), "/metrics")
    assert status.startswith("500")
    assert body == "scrape failed: cannot reach the database at db:5432 (connection refused)\n"
    # And other paths say where the metrics are
    assert _get(metrics_app(good), "/nope")[0].startswith("404")
    assert "/metrics" in _get(metrics_app(good), "/")[2]


def test_the_dashboard_imports_and_uses_only_metrics_the_exporter_serves():
    # Given the Grafana dashboard and every sample name a scrape with every kind of figure serves
    dashboard = json.loads(DASHBOARD.read_text())
    figures = _figures(batch_budgets=[BatchBudget("b1", "label", Decimal(5), Decimal(1), Decimal(0))])
    served = {s.name for m in families(figures) for s in m.samples}
    # When its panels' queries are read
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bcascade_[a-z_]+", e)}
    # Then it asks for its Prometheus as an import input, and every panel and query uses it
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    sources = [p["datasource"] for p in dashboard["panels"]] + [t["datasource"] for p in dashboard["panels"]
                                                                for t in p["targets"]]
    assert all(s == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for s in sources)
    # And every metric it queries is one the exporter serves, and the documented panels are there
    assert used and used <= served, used - served
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("jobs by status", "escalation rate", "cost per task type", "cost per model", "queue depth",
                  "request errors", "cache hit rate", "audit agreement"):
        assert topic in titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
