"""The `celery worker` command line that every launcher shares: ``cascade demo``/``dev`` (stack.py), ``cascade
eval`` (cli_eval.py), the test fixtures and the benchmarks. The queue list comes from ``cascade.publish``
(``worker_queues``), so it follows the tier count instead of being a literal in each.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["worker_command"]


def worker_command(queues: str | Sequence[str], concurrency: int, *, name: str, pool: str = "gevent",
                   app: str = "workers.app", loglevel: str = "warning", extra: Sequence[str] = ()) -> list[str]:
    """argv of a `celery worker` child of this interpreter consuming ``queues`` (names, or one comma-separated
    string) with ``concurrency`` slots of ``pool``, node name ``name`` (``%h`` is the host).

    Gossip and mingle are off: workers share no state (it lives in Postgres), and both cost every worker a
    broadcast round at start-up. ``extra`` goes last, so it can override any of these flags. Raises
    ValueError for an empty queue list.
    """
    names = queues.split(",") if isinstance(queues, str) else list(queues)
    if not names or not all(names):
        raise ValueError(f"empty queue name in {queues!r}")
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool, "-c", str(concurrency),
            "-Q", ",".join(names), "-n", name, "--without-gossip", "--without-mingle", "-l", loglevel, *extra]
