"""Values Postgres accepts: text and JSON cleaned of what would fail a whole transaction."""

from __future__ import annotations

from typing import Any

__all__ = ["pg_json", "pg_text"]


def pg_text(value: str) -> str:
    """Text Postgres accepts: no NUL character, no lone surrogate (either one fails the whole transaction)."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd")


def pg_json(value: Any) -> Any:  # Any: a parsed JSON value
    """A JSON value jsonb accepts (strings and keys as in ``pg_text``)."""
    if isinstance(value, str):
        return pg_text(value)
    if isinstance(value, list):
        return [pg_json(item) for item in value]
    if isinstance(value, dict):
        return {pg_text(str(key)): pg_json(item) for key, item in value.items()}
    return value
