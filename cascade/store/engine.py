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


def make_engine(url: str, *, pool_size: int = 5, schema: str | None = None, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; ``schema`` sets the search_path (tests give each run its own schema)."""
    args: dict[str, Any] = {"application_name": f"cascade:{schema}" if schema else "cascade"}  # Any: driver args
    if schema:
        args["options"] = f"-csearch_path={schema}"
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
