"""The Celery app: `celery -A workers.app worker -c 256 -Q tier1` (any queue set; gevent unless -P says
otherwise), `celery -A workers.app flower`. Settings come from CASCADE_* (cascade.config.CascadeSettings)."""

from __future__ import annotations

import os
import sys
from typing import Any


def _gevent_by_default(argv: list[str]) -> None:
    """`celery -A workers.app worker` with no -P/--pool runs gevent, the pool the reliability suite passes with
    (CELERY-NOTES §4), not Celery's prefork. Celery applies gevent's patches only when -P says so, before it
    imports anything else (patching here, later, leaves a worker that takes messages and never runs them), so
    the process starts again, the same way, with `-P gevent` added."""
    if "worker" not in argv or any(a in ("-P", "--pool") or a.startswith(("-P", "--pool=")) for a in argv):
        return
    at = argv.index("worker") + 1
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "celery", *argv[1:at], "-P", "gevent", *argv[at:]])


_gevent_by_default(sys.argv)

from celery import Celery
from celery.signals import celeryd_init

from cascade.config import load_settings
from cascade.errors import ConfigError
from cascade.publish import SWEEP_QUEUE, SWEEP_TASK, celery_config, configured_tiers, declare_tier_queues

settings = load_settings()
if not settings.broker_url:
    raise ConfigError("CASCADE_BROKER_URL is not set (for the embedded stack run `cascade dev` and export what "
                      "it prints)")

app = Celery("cascade", include=["workers.tasks"])
# Tier queues follow the config file when this process has one (Flower then lists them all before any worker
# consumes them); a worker needs none, since batches carry their config (see _consume_tier_queues).
app.conf.update(celery_config(settings, settings.broker_url, configured_tiers(settings)))
# `celery -A workers.app beat` runs the sweeper periodically (one beat per deployment; the sweep itself also
# holds a Postgres advisory lock). Its own queue keeps it from waiting behind a tier backlog, and `expires`
# drops sweeps that could not run in time instead of piling them up.
app.conf.beat_schedule = {
    "sweep": {
        "task": SWEEP_TASK,
        "schedule": settings.sweep_every_s,
        "options": {"queue": SWEEP_QUEUE, "expires": settings.sweep_every_s},
    },
}


@celeryd_init.connect
def _consume_tier_queues(options: dict[str, Any], **_: Any) -> None:  # Any: the worker's CLI options
    """`celery worker -Q tier4,...` consumes tier4 even where no config declares four tiers: the queues named
    by -Q are declared before the worker selects them (a name that is not a tier queue is still refused)."""
    queues = options.get("queues") or []
    declare_tier_queues(app, queues.split(",") if isinstance(queues, str) else queues)
