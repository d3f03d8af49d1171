"""Readers of /proc for the bench (CPU time and memory of a process and its descendants),
and the file descriptor limit.

A pooler may fork workers, so every figure covers the whole process tree under the pid the
bench started. Linux only (proc(5)).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime+cutime+cstime in seconds) of every live process."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17
        ticks = sum(int(x) for x in fields[11:15])
        stats[int(entry)] = (int(fields[1]), ticks / CLK_TCK)
    return stats


def _tree(stats: dict[int, tuple[int, float]], root_pid: int) -> list[int]:
    if root_pid not in stats:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def proc_tree_cpu_seconds(root_pid: int) -> float | None:
    """utime+stime (+ reaped children's) of a process and all its live descendants."""
    stats = _proc_stats()
    pids = _tree(stats, root_pid)
    return sum(stats[pid][1] for pid in pids) if pids else None


@dataclass(frozen=True)
class Memory:
    """Resident memory of a process tree in KiB.

    ``rss_kib`` adds up VmRSS (/proc/PID/status), which counts pages shared between forked
    processes once per process; ``pss_kib`` (/proc/PID/smaps_rollup) splits shared pages
    between their users, so its sum is the tree's real footprint. None where unreadable.
    """

    rss_kib: int
    pss_kib: int | None
    processes: int


def _status_kib(pid: int, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # "VmRSS:     12345 kB"
    return None


def _pss_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def proc_tree_memory(root_pid: int) -> Memory | None:
    """VmRSS and Pss of a process and all its live descendants; None if it is gone."""
    pids = _tree(_proc_stats(), root_pid)
    rss, pss, counted = 0, 0, 0
    pss_ok = True
    for pid in pids:
        value = _status_kib(pid, "VmRSS")
        if value is None:  # exited meanwhile, or a zombie (no VmRSS line)
            continue
        rss += value
        counted += 1
        p = _pss_kib(pid)
        if p is None:
            pss_ok = False
        else:
            pss += p
    if not counted:
        return None
    return Memory(rss, pss if pss_ok else None, counted)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``wanted`` if the hard limit (or root) allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # above fs.nr_open: settle for the hard limit
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new
