"""Runs one stage of the jobs of one message: claim, call or validate, record, decide, publish.

What a Celery task calls, and what tests can call without Celery. Postgres is the truth: a stage claims
its jobs with one conditional UPDATE, records their work and moves them in one transaction, and publishes
only after that commit, so a lost or duplicated message never changes a result. A message carries up to
``jobs_per_message`` job ids: their requests go out concurrently and their rows are written with one
statement per kind, so Celery's and Postgres's per-message costs are shared by those jobs.

Modules: ``context`` (what a stage needs from the process), ``ledger`` (claims, and what ends them:
moves and verdicts, decided by ``cascade.policy``), ``requests`` (the HTTP requests a tier sends and the
rows they leave), ``call`` and ``validate`` (the two stages), ``audit`` (quality audits of accepted answers).
"""

from cascade.stages.audit import run_audits
from cascade.stages.call import run_call, run_calls
from cascade.stages.context import StageContext
from cascade.stages.requests import MAX_STORED_CHARS, Request, plan_requests, send
from cascade.stages.validate import judge, run_validate, run_validates

__all__ = ["MAX_STORED_CHARS", "Request", "StageContext", "judge", "plan_requests", "run_audits", "run_call", "run_calls",
           "run_validate", "run_validates", "send"]
