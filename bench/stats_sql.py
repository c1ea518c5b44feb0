"""The escalation_stats SQL that benchmark 5 compares, read from the migrations that own it.

``UPGRADE`` and ``DOWNGRADE`` are migration 0004's (the summary, its triggers and the view on main);
``QUERY_0002`` is the SELECT behind migration 0002's view, the baseline, and ``old_view(name)`` creates it
under another name beside the migrated one.
"""

from __future__ import annotations

import importlib

__all__ = ["DOWNGRADE", "OLD_VIEW", "QUERY_0002", "UPGRADE", "old_view"]

_MIGRATION = importlib.import_module("migrations.versions.0004_stats_summary")

UPGRADE: str = _MIGRATION.UPGRADE
DOWNGRADE: str = _MIGRATION.DOWNGRADE
QUERY_0002: str = _MIGRATION.QUERY_0002


def old_view(name: str = "escalation_stats") -> str:
    """``CREATE OR REPLACE VIEW name`` with migration 0002's escalation_stats query."""
    return f"CREATE OR REPLACE VIEW {name} AS\n{QUERY_0002};\n"


#: The view as migration 0002 defines it (what DOWNGRADE restores).
OLD_VIEW = old_view()
