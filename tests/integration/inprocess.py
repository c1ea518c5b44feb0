"""Stages run in this process on a batch's messages: the same code a worker runs, with a Recorder for a broker."""

from __future__ import annotations

import time
from typing import Any

from cascade.client import Client
from cascade.providers import ProviderPool
from cascade.publish import messages
from cascade.stages import StageContext, run_audits, run_calls, run_validates
from cascade.store import Stage
from cascade.sweeper import sweep
from tests.integration.audit import Recorder


class Run:
    """A batch, and the stages run on its messages in this process until nothing is left to do."""

    def __init__(self, env, cfg, *, max_inline_wait_s: float = 1.0) -> None:
        self.env, self.config, self.publisher = env, cfg, Recorder()
        self.settings = env.settings(max_inline_wait_s=max_inline_wait_s)
        self.providers = ProviderPool()
        self.client = Client(self.settings, engine=env.engine, config=cfg, publisher=self.publisher)
        self.ctx = StageContext(env.engine, self.publisher, self.providers, self.settings)

    def submit(self, rows: list[dict[str, Any]], task: str = "label") -> str:
        return self.client.submit(task, rows, key_field="id").batch_id

    def drive(self, batch: str, timeout: float = 60) -> None:
        """Run every published message (and the sweeper's, for deferred jobs) until the batch is done or halted."""
        deadline = time.monotonic() + timeout
        while True:
            due, self.publisher.due = self.publisher.due, []
            for ids, tier, stage in messages(due, self.settings.jobs_per_message):
                if stage is Stage.AUDIT:
                    run_audits(self.ctx, ids)
                else:
                    (run_calls if stage is Stage.CALL else run_validates)(self.ctx, ids, tier)
            state = self.client.status(batch)
            if state.is_done or state.halted:
                return
            if not due:
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
                sweep(self.env.engine, self.publisher, stalled_after_s=3600)

    def close(self) -> None:
        self.providers.close()
