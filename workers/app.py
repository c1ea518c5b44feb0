"""The Celery app: `celery -A workers.app worker -P gevent -c 256 -Q tier1` (any queue set),
`celery -A workers.app flower`. Settings come from CASCADE_* (cascade.config.CascadeSettings)."""

from __future__ import annotations

from celery import Celery

from cascade.config import load_settings
from cascade.errors import ConfigError
from cascade.publish import SWEEP_QUEUE, SWEEP_TASK, celery_config

settings = load_settings()
if not settings.broker_url:
    raise ConfigError("CASCADE_BROKER_URL is not set (for the embedded stack run `cascade dev` and export what "
                      "it prints)")

app = Celery("cascade", include=["workers.tasks"])
app.conf.update(celery_config(settings, settings.broker_url))
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
