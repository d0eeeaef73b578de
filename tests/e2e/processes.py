"""Process helpers for end-to-end tests that stop or kill whole process sessions (a run, a Ray node)."""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``, read from /proc."""
    return _live_pids(SESSION_FIELD, sid)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc."""
    return _live_pids(GROUP_FIELD, pgid)


def driver_pid(run: Path) -> int:
    """The session of a local run's detached driver (its pid, as run.json records it)."""
    return json.loads((run / "run.json").read_text())["local"]["pid"]


@contextmanager
def stopped(sid: int):
    """Every process of session ``sid`` (a run's driver, its Ray, its workers) held still (SIGSTOP) inside the block,
    so that a test acts on a run at a known step on a machine of any speed."""
    pids = session_pids(sid)
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# /proc/<pid>/stat after the ")" that ends the command name: state, ppid, pgrp, session, …
GROUP_FIELD, SESSION_FIELD = 2, 3


def _live_pids(field: int, value: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
