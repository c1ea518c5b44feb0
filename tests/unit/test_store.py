"""The job state machine's table (cascade.store.TRANSITIONS), checked without Postgres."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cascade import store
from cascade.errors import CascadeError, IllegalTransition
from cascade.store import TRANSITIONS, Claim, JobStatus, Move, Stage
from tests.conftest import ROOT


class _NoStatements:
    """A connection that must not be used: the check comes before any SQL."""

    def execute(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("move_many ran a statement for an illegal move")


def _claim(job_id: int) -> Claim:
    return Claim(job_id, "b", f"k{job_id}", {}, 1, Stage.CALL, 1)


ILLEGAL_FROM_RUNNING = sorted(set(JobStatus) - TRANSITIONS[JobStatus.RUNNING])


@pytest.mark.parametrize("status", ILLEGAL_FROM_RUNNING)
def test_move_many_refuses_a_move_the_table_does_not_allow(status: JobStatus) -> None:
    # Given claims (jobs in `running`) and a batch of moves, one of them not in TRANSITIONS[running]
    moves = [Move(_claim(1), JobStatus.SUCCEEDED, 1, Stage.CALL), Move(_claim(2), status, 1, Stage.CALL)]

    # When they are applied
    with pytest.raises(IllegalTransition) as caught:
        store.move_many(_NoStatements(), moves)  # type: ignore[arg-type]

    # Then the whole batch is refused with a cascade error naming the job and the move, before any SQL
    assert isinstance(caught.value, CascadeError)
    assert (caught.value.job_id, caught.value.from_status, caught.value.to_status) == (2, JobStatus.RUNNING, status)
    assert str(caught.value) == f"job 2: running -> {status.value} is not an allowed move (store.TRANSITIONS)"


def test_the_check_survives_python_dash_o() -> None:
    # Given a Python that strips assert statements (-O)
    probe = ("from cascade import store\n"
             "from cascade.store import Claim, JobStatus, Move, Stage\n"
             "try:\n"
             "    store.move_many(None, [Move(Claim(1, 'b', 'k', {}, 1, Stage.CALL, 1), JobStatus.RUNNING, 1,"
             " Stage.CALL)])\n"
             "except Exception as exc:\n"
             "    print(type(exc).__name__)\n")

    # When move_many gets an illegal move
    proc = subprocess.run([sys.executable, "-O", "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)

    # Then it is still refused with IllegalTransition (not, say, an AttributeError from running the SQL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "IllegalTransition"


def test_every_status_has_a_row_and_terminal_ones_go_nowhere_but_a_retry() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert TRANSITIONS[JobStatus.SUCCEEDED] == frozenset()
    # a failed or cancelled job only ever runs again from the queue (cascade retry --failed)
    assert TRANSITIONS[JobStatus.FAILED] == TRANSITIONS[JobStatus.CANCELLED] == frozenset({JobStatus.QUEUED})
    # a job is cancelled only from the queue (cancel_batch); a running one through its move
    assert [s for s, to in TRANSITIONS.items() if JobStatus.CANCELLED in to] == [JobStatus.QUEUED]


_ON_JOBS_OR_BATCHES = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|COPY)\s+(?:jobs|batches)\b")


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "cascade").rglob("*.py") if "store" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT / "cascade")))
def test_statements_on_jobs_and_batches_live_in_store(path: Path) -> None:
    # Given a cascade module outside cascade/store/
    source = path.read_text(encoding="utf-8")
    # When its text is searched for SQL that reads or writes jobs or batches
    found = _ON_JOBS_OR_BATCHES.findall(source)
    # Then there is none: every such statement (and the database errors it raises) belongs to store
    assert not found, f"{path.name}: {found}"
