"""``cascade metrics``: serve Prometheus metrics read from Postgres and the broker at each scrape.

Registered in ``cli.py`` as ``app.command("metrics")(metrics_command)``. The metrics and how each is computed
are in docs/metrics.md; the reading is ``cascade.metrics``. Exit codes: 0 stopped (Ctrl-C or SIGTERM), 2 bad
config or a port that cannot be bound. A database that does not answer does not stop it: scrapes answer 500
until it does.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Annotated, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import typer

from cascade.cli_common import err, fail, make_client, url_host
from cascade.client import Client
from cascade.errors import CascadeError, ConfigError

if TYPE_CHECKING:  # imported when the command runs: other commands need not load prometheus_client
    from prometheus_client import CollectorRegistry

    from cascade.metrics import CascadeCollector

__all__ = ["metrics_app", "metrics_command"]

Environ = dict[str, Any]  # Any: WSGI environ values
StartResponse = Callable[..., Any]  # Any: WSGI's start_response


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never keeps the process from stopping


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds)."""


def metrics_app(registry: CollectorRegistry) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """A WSGI app serving ``registry`` on ``/metrics`` (text format, or OpenMetrics when asked for). A scrape that
    cannot read its figures answers 500 with one line saying why."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"cascade metrics: GET /metrics\n"]
        if path.rstrip("/") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are on /metrics\n"]
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        try:
            body = encoder(registry)
        except CascadeError as exc:
            err.print(f"scrape failed: {exc}", markup=False, highlight=False, soft_wrap=True)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"scrape failed: {exc}\n".encode()]
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    return app


def _daily_caps(client: Client) -> dict[str, Decimal]:
    """Each task type's daily budget from the config, or none (said on stderr) when it cannot be loaded."""
    try:
        config = client.config
    except ConfigError as exc:
        err.print(f"note: no config loaded, so no cascade_task_budget_per_day_usd: {exc}", markup=False,
                  highlight=False, soft_wrap=True)
        return {}
    return {t.name: t.budget.per_day_usd for t in config.task_types if t.budget is not None}


def _collector(client: Client, timeout_s: float) -> CascadeCollector:
    from cascade.metrics import CascadeCollector

    settings = client.settings
    queue_lengths = None
    if settings.broker_url:
        publisher = client.publisher

        def queue_lengths() -> dict[str, int]:
            return publisher.queue_lengths()
    else:
        err.print("note: CASCADE_BROKER_URL is not set, so no cascade_queue_messages", highlight=False)
    return CascadeCollector(client.engine, queue_lengths=queue_lengths, daily_caps=_daily_caps(client),
                            timeout_s=timeout_s, database_host=url_host(settings.database_url))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def metrics_command(
    port: Annotated[int, typer.Option(help="TCP port to serve /metrics on (0: any free port, printed).")] = 9108,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(
        min=0.1, help="Seconds a scrape may spend on one Postgres statement before it answers 500.")] = 10.0,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="cascade.yaml, for the task types' daily budgets (default: $CASCADE_CONFIG).")] = None,
) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics, read from Postgres and the broker at each scrape.

    Jobs per status, escalations per tier, cost per task type and per model, requests per model and error,
    queue depths, the request cache, budgets and audits (every metric: docs/metrics.md). Each scrape reads
    Postgres in one snapshot and never a ledger table whole; the process reads each once when it starts. A
    scrape the database cannot answer gets 500 and one line saying why; the next one tries again. Settings
    come from CASCADE_DATABASE_URL, CASCADE_BROKER_URL (queue depths; without it they are left out) and
    CASCADE_CONFIG. Stops on Ctrl-C or SIGTERM.
    """
    from prometheus_client import CollectorRegistry

    try:
        client = make_client(config)
        collector = _collector(client, timeout)
    except CascadeError as exc:
        fail(exc)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server = make_server(host, port, metrics_app(registry), server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        client.close()
        fail(ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", path="--port"))
    # SIGTERM stops it as Ctrl-C does: the server closes, then the database and broker connections.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    marking = None
    try:
        err.print("reading the ledger once (later scrapes read only what is new)...", highlight=False)
        try:
            collector.warm_up()
        except CascadeError as exc:
            # Served all the same: scrapes answer 500 saying why until the database answers.
            err.print(f"warning: {exc}", markup=False, highlight=False, soft_wrap=True)
        marking = collector.start_marking()
        err.print(f"serving http://{host}:{server.server_port}/metrics (Ctrl-C stops)", markup=False,
                  highlight=False, soft_wrap=True)
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if marking is not None:
            marking.set()
        server.server_close()
        client.close()
