"""The `local` target: an embedded Ray on this machine, the trainer entrypoint in a child process.

The child's output goes to ``logs/driver.log`` in the run folder, so an internal failure leaves its traceback
there and the user's terminal shows the progress and one message. `start` is what ``tunerun run`` uses (it
follows the child until it exits); ``submit --target local`` starts the same child and returns.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tunerun.cluster.run_folder import DRIVER_LOG, RunFolder
from tunerun.cluster.runs import Handle, RunInfo, create_run, read_info, update_info
from tunerun.cluster.storage import cache_root, process_alive
from tunerun.cluster.targets import Observation, Target, tail_file, trainer_command, wait_until
from tunerun.jobs.plan import ResolvedJob

CANCEL_GRACE_S = 20.0  # SIGTERM, then SIGKILL: the driver checkpoints and stops meanwhile


class LocalHandle(Handle):
    """The driver process of a `local` run, valid on the host that started it."""

    pid: int
    log: str
    host: str


def driver_log_path(run: RunFolder) -> Path:
    """Where the driver's output goes: in the run folder when it is local, else a local spool uploaded at the end."""
    if run.is_local:
        return run.local_path(DRIVER_LOG)
    return cache_root() / "logs" / run.run_id / Path(DRIVER_LOG).name


def start(job: ResolvedJob, resume: bool = False,
          launch: list[str] | None = None) -> tuple[RunFolder, subprocess.Popen]:
    """Create the run and start its driver in a child process; the caller may follow or wait for it. ``launch``:
    the job file and --set overrides it came from, recorded so that messages can give the exact resume command."""
    run = create_run(job, LocalTarget.name, resume, launch=launch)
    log_path = driver_log_path(run)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            trainer_command(job, python=sys.executable), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "TUNERUN_DRIVER_LOG": str(log_path)},
            start_new_session=True,  # its own process group: cancel stops Ray workers too
        )
    handle = LocalHandle(pid=process.pid, log=str(log_path), host=socket.gethostname())
    update_info(run, **{LocalTarget.name: handle.model_dump()})
    return run, process


class LocalTarget(Target):
    name = "local"
    Handle = LocalHandle

    def submit(self, job: ResolvedJob, resume: bool = False) -> RunFolder:
        return start(job, resume)[0]

    def observe(self, info: RunInfo) -> Observation | None:
        handle = self.handle(info)
        pid = _driver_pid(handle)
        if pid is None:  # started on another host: only the run folder can tell
            return None
        return Observation(handle, ended=not process_alive(pid),
                           error=f"the driver (pid {pid}) is gone without recording an outcome (killed: out of "
                                 f"memory, kill -9, a reboot); its log: {handle.log}")

    def stop(self, info: RunInfo) -> bool:
        """SIGTERM the driver's session (the driver, Ray's processes, the workers), then SIGKILL whatever is left
        of it after `CANCEL_GRACE_S`; returns once none of it runs."""
        pid = _driver_pid(self.handle(info))
        if not pid or not process_alive(pid):
            return False
        os.killpg(pid, signal.SIGTERM)
        if not wait_until(lambda: not _session_alive(pid), CANCEL_GRACE_S, 0.2):
            os.killpg(pid, signal.SIGKILL)
            wait_until(lambda: not _session_alive(pid), 10.0, 0.1)
        return True

    def describe(self, info: RunInfo) -> str:
        handle = self.handle(info)
        return f"driver pid {handle.pid} on {handle.host}" if handle else self.name

    def logs(self, run: RunFolder, write, follow: bool = False) -> None:
        log = Path(handle.log) if (handle := self.handle(read_info(run))) else None
        if log is None or not log.is_file():  # the driver ran on another host: read the copy it left
            super().logs(run, write, follow)
            return
        tail_file(log, write, follow, done=lambda: self.status(run).state.terminal)


def _driver_pid(handle: LocalHandle | None) -> int | None:
    """The local driver's pid, if it ran on this host (a run folder on S3 is seen from many machines)."""
    if handle is None or handle.host != socket.gethostname():
        return None
    return handle.pid


def _session_alive(sid: int) -> bool:
    """Whether a process of session ``sid`` still runs (zombies do not count); the driver leads its session."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the driver stands for its session
        return process_alive(sid)
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False
