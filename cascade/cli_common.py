"""What every ``cascade`` command shares: the stderr console, the client, and how errors end a command.

Exit codes: 2 for cascade's own errors (bad input or config), 4 when the database or the broker cannot be
reached (one line naming the host, never a password).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import parse_qs, urlsplit

import typer
from rich.markup import escape

from cascade.client import Client
from cascade.config import load_settings
from cascade.display import console
from cascade.errors import CascadeError, ServiceUnreachable

__all__ = ["EXIT_UNREACHABLE", "err", "fail", "guard", "make_client", "url_host"]

err = console(stderr=True)
T = TypeVar("T")
#: the database or the broker did not answer (a batch committed before the broker failed is on stdout)
EXIT_UNREACHABLE = 4


def make_client(config: Path | None = None) -> Client:
    return Client(load_settings(config=config))


def guard(fn: Callable[[], T]) -> T:
    """Turn cascade's errors into a message on stderr and exit code 2, and an unreachable database or broker
    into one line naming its host and exit code 4."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from cascade.publish import broker_errors

    try:
        return fn()
    except ServiceUnreachable as exc:
        fail(_with_host(exc), EXIT_UNREACHABLE)
    except (OperationalError, InterfaceError) as exc:
        fail(_with_host(ServiceUnreachable("database", detail=_first_line(exc.orig or exc))), EXIT_UNREACHABLE)
    except broker_errors() as exc:
        fail(_with_host(ServiceUnreachable("broker", detail=_first_line(exc))), EXIT_UNREACHABLE)
    except CascadeError as exc:
        fail(exc)


def _with_host(exc: ServiceUnreachable) -> ServiceUnreachable:
    """The error again, naming the host the settings point at (never the URL's password)."""
    if exc.host:
        return exc
    try:
        settings = load_settings()
    except CascadeError:
        return exc
    url = settings.database_url if exc.service == "database" else settings.broker_url
    return ServiceUnreachable(exc.service, host=url_host(url), detail=exc.detail, batch_id=exc.batch_id)


def url_host(url: str | None) -> str:
    """Where a service URL points, without user or password: ``host:port``, or the socket path."""
    try:
        parts = urlsplit(url or "")
        port = parts.port
    except ValueError:
        return ""
    if parts.hostname:
        return f"{parts.hostname}:{port}" if port else parts.hostname
    query = parse_qs(parts.query)
    socket = query.get("host") or query.get("unix_socket_path") or query.get("socket")
    return socket[0] if socket else parts.path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def fail(exc: CascadeError, code: int = 2) -> NoReturn:
    # The message may hold user data (paths, keys, rows): escaped, never folded mid-word.
    err.print("[red]error:[/red] " + escape(str(exc)), highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


