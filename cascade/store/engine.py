"""The engine: one per process, built at the edges and passed down (never a global)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError

__all__ = ["database_errors", "make_engine", "normalize_url"]


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 5, schema: str | None = None, pre_ping: bool = True,
                idle_in_transaction_s: float | None = None) -> Engine:
    """An engine for ``url``; ``schema`` sets the search_path (tests give each run its own schema).

    ``idle_in_transaction_s``: the server ends a session left idle inside a transaction that long (a worker
    frozen mid-transaction), so the row locks it holds (a job, a request cache key, a batch's budget) do not
    stall every other worker until it resumes. Workers set it; the CLI does not (a submit may read a slow
    pipe between statements of its transaction)."""
    args: dict[str, Any] = {"application_name": f"cascade:{schema}" if schema else "cascade"}  # Any: driver args
    options = [f"-csearch_path={schema}"] if schema else []
    if idle_in_transaction_s is not None:
        options.append(f"-cidle_in_transaction_session_timeout={round(idle_in_transaction_s * 1000)}")
    if options:
        args["options"] = " ".join(options)
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        connect_args=args,
    )


def database_errors() -> tuple[type[Exception], ...]:
    """What a Postgres outage or a lost connection raises (SQLAlchemy's DBAPIError), for loops that retry later."""
    return (DBAPIError,)
