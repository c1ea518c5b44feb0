"""Tools from Debian's packages that a test needs (a browser, a connection pooler): found, or installed by the
test set-up (as root, with apt-get, one installer at a time), or the reason they cannot be."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["INSTALL_TIMEOUT_S", "find_or_install"]

#: the longest an apt-get install may take before the test is skipped for it
INSTALL_TIMEOUT_S = 300


def _find(binaries: Sequence[str]) -> str | None:
    for name in binaries:
        found = shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                            if (p := Path(d) / name).is_file() and os.access(p, os.X_OK)), None)
        if found:
            return found
    return None


def _install(package: str) -> str | None:
    """apt-get install ``package``; the reason when it cannot be done here."""
    if getattr(os, "geteuid", lambda: 1)() != 0 or not shutil.which("apt-get"):
        return f"{package} is not installed, and installing it needs root and apt-get (apt-get install -y {package})"
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    deadline, last = time.monotonic() + INSTALL_TIMEOUT_S, ""
    # The package lists may be stale (a 404 on a replaced version): update them once, then try again.
    for cmd in (install, ["apt-get", "update", "-q"], install):
        try:
            proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, check=False,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in {INSTALL_TIMEOUT_S} s"
        last = (proc.stderr.strip() or proc.stdout.strip())[-300:]
        if cmd is install and proc.returncode == 0:
            return None
    return f"apt-get install {package} failed: {last}"


def find_or_install(package: str, binaries: Sequence[str]) -> tuple[str | None, str | None]:
    """(path of the first of ``binaries`` found, None), installing ``package`` first when none is; (None, why)
    when it cannot be. xdist workers may get here together: one installs, the others wait and find it."""
    found = _find(binaries)
    if found is not None:
        return found, None
    with open(f"/tmp/cascade-test-{package}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _find(binaries)
        why = None if found else _install(package)
        found = found or _find(binaries)
    return found, None if found else why
