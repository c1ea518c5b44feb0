"""The real cascade worker app with the hop probe connected: `celery -A bench.probe_app worker ...`."""

from __future__ import annotations

import workers.tasks  # noqa: F401  (registers the tasks)
from bench import probe
from workers.app import app, settings

probe.install(app, settings.key_prefix)

__all__ = ["app"]
