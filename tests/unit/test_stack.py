"""cascade.stack's wait for a child's HTTP endpoint: a child that never answers is an error, not silence."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cascade.stack import StackError, _wait_http, free_port


def test_an_endpoint_that_never_answers_raises_naming_it():
    # Given a port nothing listens on
    url = f"http://127.0.0.1:{free_port()}/healthcheck"
    # When the stack waits for it, Then it fails after the timeout, naming the URL
    with pytest.raises(StackError, match=r"/healthcheck did not answer within 0\.5 s"):
        _wait_http(url, 0.5)


def test_a_child_that_exits_fails_the_wait_at_once_with_its_log(tmp_path: Path):
    # Given a child that writes to its log and exits 3 without ever listening
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('port already in use'); raise SystemExit(3)"],
                                stdout=out, stderr=subprocess.STDOUT)
    proc.wait(10)
    # When the stack waits for its endpoint with a long timeout
    started = time.monotonic()
    with pytest.raises(StackError) as caught:
        _wait_http(f"http://127.0.0.1:{free_port()}/healthcheck", 30, proc=proc, log=log)
    # Then it fails at once, with the exit code, the log's path and its last lines
    assert time.monotonic() - started < 5
    assert "exited with code 3" in str(caught.value)
    assert str(log) in str(caught.value) and "port already in use" in str(caught.value)
