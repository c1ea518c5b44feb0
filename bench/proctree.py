"""CPU seconds of whole process trees (a process and all its descendants), read from /proc through psutil.

A tree's figure counts the live processes and what each of them has already reaped: a Postgres backend that
exits is added to the postmaster's ``children_user``/``children_system`` once the postmaster waits for it, so
the difference of two readings is the tree's CPU between them even when backends come and go in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

__all__ = ["TreeMeter", "machine_busy", "self_cpu", "tree_cpu"]


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid``, its live descendants and the children they reaped; 0.0 once it is
    gone. Another user's processes are read too (/proc/<pid>/stat is world-readable)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue  # exited after the listing: its time reaches its parent's children_* once reaped
        total += t.user + t.system + t.children_user + t.children_system
    return total


def self_cpu() -> float:
    """This process's own user + system seconds (not its children: those are the processes it measures)."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores: busy excludes idle and iowait."""
    t = psutil.cpu_times()
    total = float(sum(t))
    return total - t.idle - getattr(t, "iowait", 0.0), total


@dataclass(frozen=True)
class TreeMeter:
    """Named groups of process trees; ``read`` gives each root's tree CPU seconds, in the groups' order."""

    groups: dict[str, list[int]]

    def read(self) -> dict[str, list[float]]:
        return {name: [tree_cpu(pid) for pid in pids] for name, pids in self.groups.items()}
