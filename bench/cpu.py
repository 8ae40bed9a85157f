"""CPU time of processes from /proc: a server process, or PostgreSQL's postmaster with all its children."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after its last ")".
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process (all its threads); 0 when it is gone."""
    fields = _fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children(parent: int) -> list[int]:
    """The pids whose parent is `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _fields(int(entry))
        if fields is not None and int(fields[1]) == parent:
            found.append(int(entry))
    return found


Snapshot = dict[int, float]


def snapshot(pids: Iterable[int]) -> Snapshot:
    """CPU seconds of each of `pids` that is alive now."""
    found = {}
    for pid in pids:
        fields = _fields(pid)
        if fields is not None:
            found[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    return found


def tree_snapshot(root: int) -> Snapshot:
    """CPU seconds of `root` and of each of its direct children alive now."""
    return snapshot([root, *children(root)])


def spent(before: Snapshot, after: Snapshot) -> float:
    """CPU seconds spent between two snapshots by the processes alive at the second.

    A process born in between counts in full; one that exited in between is lost (its
    CPU left with it), which can only make the figure smaller, never negative, as a
    plain difference of sums would when a busy process exits.
    """
    return sum(max(0.0, value - before.get(pid, 0.0)) for pid, value in after.items())
