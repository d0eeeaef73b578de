"""The `local` target: an embedded Ray on this machine, the trainer entrypoint in a child process.

The child's output goes to ``logs/driver.log`` in the run folder, so an internal failure leaves its traceback
there and the user's terminal shows the progress and one message.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from tunerun.cluster.storage import TERMINAL_STATES, RunFolder
from tunerun.jobs.plan import ResolvedJob

NAME = "local"


def create_run(job: ResolvedJob, target: str) -> RunFolder:
    """Write the resolved job and the initial run.json: the run exists from here on."""
    run = RunFolder(job.spec.storage.uri, job.run_id)
    relaunch = run.exists("run.json")
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    fields = {} if relaunch else {"created_at": time.time()}
    # A relaunched run id keeps its data and checkpoints: training resumes from the newest complete one.
    run.update_run_info(run_id=job.run_id, name=job.spec.name, state="pending", target=target,
                        method=job.spec.method.kind, workers=job.spec.resources.num_workers,
                        error=None, error_kind=None, **fields)
    run.event("run_relaunched" if relaunch else "run_created", target=target)
    return run


def submit(job: ResolvedJob) -> tuple[RunFolder, subprocess.Popen]:
    run = create_run(job, NAME)
    log_path = run.file("logs/driver.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tunerun.trainer", str(run.path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: cancel stops Ray workers too
        )
    run.update_run_info(local={"pid": process.pid, "log": str(log_path)})
    return run, process


def status(run: RunFolder) -> dict:
    info = run.read_json("run.json")
    pid = info.get("local", {}).get("pid")
    if info.get("state") not in TERMINAL_STATES and pid and not _alive(pid):
        info["state"] = "failed"
        info["error"] = "the driver process is gone without recording an outcome; see logs/driver.log"
    return info


def cancel(run: RunFolder, grace_s: float = 20.0) -> bool:
    """SIGTERM the driver's process group, then SIGKILL after ``grace_s``. True if something was running."""
    pid = run.read_json("run.json").get("local", {}).get("pid")
    if not pid or not _alive(pid):
        return False
    run.event("cancel_requested")
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    if run.read_json("run.json").get("state") not in TERMINAL_STATES:  # the driver had no chance to say so
        run.update_run_info(state="cancelled", finished_at=time.time())
        run.event("run_cancelled")
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
