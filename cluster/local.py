"""The `local` target: an embedded Ray on this machine, the trainer entrypoint in a child process.

The child's output goes to ``logs/driver.log`` in the run folder, so an internal failure leaves its traceback
there and the user's terminal shows the progress and one message.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunerun.cluster.storage import TERMINAL_STATES, RunFolder
from tunerun.jobs.errors import TargetError
from tunerun.jobs.plan import ResolvedJob

NAME = "local"


def create_run(job: ResolvedJob, target: str, resume: bool = False) -> RunFolder:
    """Write the resolved job and the initial run.json: the run exists from here on.

    An existing run id is only taken over with ``resume`` (or by a target restarting the same job, such as a
    Slurm requeue): a finished run is never overwritten by accident.
    """
    if job.spec.storage.is_s3:
        from tunerun.cluster.s3 import check_access

        check_access(job.spec.storage)  # bad credentials or a missing bucket fail here, before anything starts
    run = RunFolder(job.spec.storage, job.run_id)
    exists = run.exists("run.json")
    if exists and not resume:
        state = run.read_json("run.json").get("state")
        raise TargetError(f"run {job.run_id} already exists in {job.spec.storage.uri} (state {state}); "
                          f"continue it with --resume {job.run_id}, or choose another --run-id")
    if resume and not exists:
        raise TargetError(f"--resume {job.run_id}: no such run in {job.spec.storage.uri}")
    if resume and status(run).get("state") in ("pending", "running"):
        raise TargetError(f"run {job.run_id} is still running; cancel it first (tunerun cancel {job.run_id})")
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    fields = {} if exists else {"created_at": time.time()}
    # A resumed run keeps its data and checkpoints: training continues from the newest complete one.
    run.update_run_info(run_id=job.run_id, name=job.spec.name, state="pending", target=target,
                        method=job.spec.method.kind, workers=job.spec.resources.num_workers,
                        error=None, error_kind=None, **fields)
    run.event("run_resumed" if exists else "run_created", target=target)
    run.flush()
    return run


def driver_log_path(run: RunFolder) -> Path:
    """Where the driver's output goes: in the run folder when it is local, else a local spool uploaded at the end."""
    if run.is_local:
        return run.local_path("logs/driver.log")
    cache = Path(os.environ.get("TUNERUN_CACHE", Path.home() / ".cache" / "tunerun"))
    return cache / "logs" / run.run_id / "driver.log"


def submit(job: ResolvedJob, resume: bool = False) -> tuple[RunFolder, subprocess.Popen]:
    run = create_run(job, NAME, resume)
    log_path = driver_log_path(run)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tunerun.trainer", run.uri()]
    if job.spec.storage.endpoint_url:
        command += ["--endpoint-url", job.spec.storage.endpoint_url]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "TUNERUN_DRIVER_LOG": str(log_path)},
            start_new_session=True,  # its own process group: cancel stops Ray workers too
        )
    run.update_run_info(local={"pid": process.pid, "log": str(log_path), "host": socket.gethostname()})
    return run, process


def _driver_pid(info: dict) -> int | None:
    """The local driver's pid, if it ran on this host (a run folder on S3 is seen from many machines)."""
    local = info.get("local") or {}
    return local.get("pid") if local.get("host", socket.gethostname()) == socket.gethostname() else None


def status(run: RunFolder) -> dict:
    info = run.read_json("run.json")
    pid = _driver_pid(info)
    if info.get("state") not in TERMINAL_STATES and pid and not _alive(pid):
        info["state"] = "failed"
        info["error"] = "the driver process is gone without recording an outcome; see logs/driver.log"
    return info


def cancel(run: RunFolder, grace_s: float = 20.0) -> bool:
    """SIGTERM the driver's process group, then SIGKILL after ``grace_s``. True if something was running."""
    pid = _driver_pid(run.read_json("run.json"))
    if not pid or not _alive(pid):
        return False
    run.event("cancel_requested")
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    # Whatever the driver recorded while it went down, the user asked for this run to end as cancelled.
    run.update_run_info(state="cancelled", finished_at=time.time(), error=None, error_kind=None)
    run.event("run_cancelled")
    run.flush()
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A finished child of ours that nobody reaped yet is a zombie: not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
