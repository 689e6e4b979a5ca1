"""Process helpers for the test harness: a server's process tree, its CPU time, and
signalling or killing a whole process group (used by ``kvbridge.testing.cluster``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children_map() -> dict[int, list[int]]:
    """Map pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (f := _stat_fields(int(entry))) is not None:
            children.setdefault(int(f[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its live descendants."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_snapshot(pid: int) -> dict[int, float]:
    """User+system CPU seconds used so far by ``pid`` and each of its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in process_tree(pid):
        if (f := _stat_fields(p)) is not None:  # else: exited meanwhile
            out[p] = (int(f[11]) + int(f[12])) / ticks  # utime + stime (stat fields 14, 15)
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used so far by ``pid`` and all its live descendants."""
    return sum(cpu_snapshot(pid).values())


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two ``cpu_snapshot``s of one tree.

    Summed per process: a process that left the tree meanwhile loses only its last slice, and
    one that joined counts from its start.
    """
    return sum(max(0.0, t - before.get(p, 0.0)) for p, t in after.items())


def cpu_used(pid: int, seconds: float) -> float:
    """CPU seconds used by ``pid``'s process tree during the next ``seconds`` of wall time."""
    before = cpu_snapshot(pid)
    time.sleep(seconds)
    return cpu_delta(before, cpu_snapshot(pid))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])



def _kill_group(popen: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process group of ``popen`` (and descendants that left it), then SIGKILL."""
    pgid = popen.pid

    def members() -> set[int]:
        return set(process_tree(pgid) if popen.poll() is None else []) | _group_members(pgid)

    tracked = members()
    _signal_all(pgid, tracked, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        tracked |= members()
        if popen.poll() is not None and not _live(tracked):
            return
        time.sleep(0.1)
    _signal_all(pgid, tracked | members(), signal.SIGKILL)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (f := _stat_fields(int(entry))) and f[0] != "Z" and int(f[2]) == pgid:
            out.add(int(entry))
    return out


def _live(pids: Iterable[int]) -> set[int]:
    """The members of ``pids`` still running (zombies count as dead)."""
    return {p for p in pids if (f := _stat_fields(p)) is not None and f[0] != "Z"}


def _signal_all(pgid: int, pids: Iterable[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in _live(pids):
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass
