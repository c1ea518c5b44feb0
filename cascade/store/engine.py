"""The engine: one per process, built at the edges and passed down (never a global)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError

__all__ = ["database_errors", "make_engine", "normalize_url"]


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int | None = None, schema: str | None = None,
                pre_ping: bool = True, idle_in_transaction_s: float | None = None, pooler: str = "none",
                application_name: str | None = None) -> Engine:
    """An engine for ``url``; ``schema`` sets the search_path (tests give each run its own schema).

    ``idle_in_transaction_s``: the server ends a session left idle inside a transaction that long (a worker
    frozen mid-transaction), so the row locks it holds (a job, a request cache key, a batch's budget) do not
    stall every other worker until it resumes. Workers set it; the CLI does not (a submit may read a slow
    pipe between statements of its transaction).

    ``pooler="transaction"``: ``url`` is a PgBouncer in transaction pooling mode, where a session's state does not
    survive its transaction: no prepared statements, no startup options (the search_path is set in each
    transaction instead, one more round trip; PgBouncer's own ``idle_transaction_timeout`` takes the place of
    ``idle_in_transaction_s``). ``max_overflow`` defaults to ``pool_size``."""
    name = application_name or (f"cascade:{schema}" if schema else "cascade")
    args: dict[str, Any] = {"application_name": name[:63]}  # Any: driver args
    options = []
    if pooler == "transaction":
        args["prepare_threshold"] = None
    else:
        options += [f"-csearch_path={schema}"] if schema else []
        if idle_in_transaction_s is not None:
            options.append(f"-cidle_in_transaction_session_timeout={round(idle_in_transaction_s * 1000)}")
    if options:
        args["options"] = " ".join(options)
    engine = create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=pre_ping,
        connect_args=args,
    )
    if pooler == "transaction" and schema:
        set_path = f"SET LOCAL search_path TO {_ident(schema)}"

        @event.listens_for(engine, "begin")
        def _search_path(conn: Connection) -> None:
            # on the driver's connection: a Connection streaming results would wrap it in a server-side cursor
            with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute(set_path)

    return engine


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def database_errors() -> tuple[type[Exception], ...]:
    """What a Postgres outage or a lost connection raises (SQLAlchemy's DBAPIError), for loops that retry later."""
    return (DBAPIError,)
