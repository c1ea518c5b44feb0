"""The shared `celery worker` command line (cascade.workercmd.worker_command)."""

from __future__ import annotations

import sys

import pytest

from cascade.publish import worker_queues
from cascade.workercmd import worker_command


def test_the_command_runs_celery_of_this_interpreter_on_the_queues_given():
    cmd = worker_command(worker_queues(4), 16, name="w@%h")
    assert cmd == [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "gevent", "-c", "16",
                   "-Q", "tier1,tier2,tier3,tier4,validate,audit", "-n", "w@%h", "--without-gossip", "--without-mingle",
                   "-l", "warning"]


def test_a_comma_separated_string_pool_app_and_extra_flags_go_through():
    cmd = worker_command("tier1,validate", 4, name="b@%h", pool="threads", app="bench.probe_app", loglevel="info",
                         extra=("--without-heartbeat",))
    assert cmd[4:12] == ["bench.probe_app", "worker", "-P", "threads", "-c", "4", "-Q", "tier1,validate"]
    assert cmd[-3:] == ["-l", "info", "--without-heartbeat"]


@pytest.mark.parametrize("queues", [[], "", "tier1,,validate", ["tier1", ""]])
def test_an_empty_queue_name_is_refused(queues):
    with pytest.raises(ValueError, match="empty queue name"):
        worker_command(queues, 1, name="w@%h")
