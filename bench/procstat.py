"""Readers of /proc for the bench: CPU time and memory of a process and its descendants."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_tree_cpu_seconds(root_pid: int) -> float | None:
    """utime+stime (+ reaped children's) of a process and all its live descendants."""
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
    if root_pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total
