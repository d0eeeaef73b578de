"""The `ray` target: an existing Ray cluster, reached through its Job Submission API (the dashboard's HTTP port).

``submit`` writes the run folder (job.yaml, run.json) where the cluster can read it — S3-compatible storage, or a
folder every node shares — then asks the cluster to run ``python -m tunerun.trainer <run-uri>``; the submission
id goes into run.json, and ``status``/``logs``/``cancel`` ask the same API about it.

Credentials never travel with the job: Ray shows a job's runtime environment in its dashboard, so the cluster
uses its own (the environment ``ray start`` ran in, an instance role, ~/.aws on the nodes). Only variables
named in ``targets.ray.env_vars`` — which the spec refuses when they look like secrets — are copied from the
submitting shell. Authentication to the cluster (``RAY_AUTH_TOKEN``) is Ray's own, read from the environment.
"""
from __future__ import annotations

import os
import shlex
import time

import yaml

from tunerun.cluster.local import create_run
from tunerun.cluster.storage import TERMINAL_STATES, RunFolder
from tunerun.jobs.errors import TargetError
from tunerun.jobs.plan import ResolvedJob

NAME = "ray"
POLL_S = 1.0
STOP_WAIT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S; the driver checkpoints meanwhile


def submission(job: ResolvedJob, attempt: int = 1, environ: dict | None = None) -> dict:
    """What `submit` sends to the Job Submission API (``attempt`` > 1 for a resumed run: ids are single-use)."""
    environ = os.environ if environ is None else environ
    target = job.spec.targets.ray
    command = ["python", "-m", "tunerun.trainer", job.run_uri]
    if job.spec.storage.endpoint_url:
        command += ["--endpoint-url", job.spec.storage.endpoint_url]
    runtime_env: dict = {"env_vars": {name: environ[name] for name in target.env_vars if name in environ}}
    if target.pip:
        runtime_env["pip"] = list(target.pip)
    return {
        "address": target.address,
        "submission_id": f"tunerun-{job.run_id}" + (f"-{attempt}" if attempt > 1 else ""),
        "entrypoint": shlex.join(command),
        "runtime_env": runtime_env,
        "metadata": {"tunerun_run_id": job.run_id, "tunerun_run_uri": job.run_uri},
    }


def render(job: ResolvedJob) -> str:
    """The submission request as YAML (pure apart from reading the named variables' values)."""
    request = submission(job)
    missing = [name for name in job.spec.targets.ray.env_vars if name not in request["runtime_env"]["env_vars"]]
    text = yaml.safe_dump(request, sort_keys=False)
    return text + (f"# not set in this shell, so not passed: {', '.join(missing)}\n" if missing else "")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or its AuthenticationError
        raise TargetError(f"cannot reach the Ray Job Submission API at {address}: {exc}; check --address (the "
                          "dashboard's port, 8265 by default) and, on clusters with token authentication, "
                          "RAY_AUTH_TOKEN") from None


def submit(job: ResolvedJob, resume: bool = False) -> RunFolder:
    address = job.spec.targets.ray.address
    client = _client(address)  # before the run folder exists: a wrong address leaves nothing behind
    run = create_run(job, NAME, resume)
    earlier = (run.read_json("run.json").get("ray") or {}).get("submissions", [])
    request = submission(job, attempt=len(earlier) + 1)
    try:
        client.submit_job(entrypoint=request["entrypoint"], submission_id=request["submission_id"],
                          runtime_env=request["runtime_env"], metadata=request["metadata"])
    except (RuntimeError, ConnectionError, ValueError) as exc:
        run.update_run_info(state="failed", error=f"Ray refused the job: {exc}", error_kind="user",
                            finished_at=time.time())
        run.flush()
        raise TargetError(f"the Ray cluster at {address} refused the job: {exc}") from None
    run.update_run_info(ray={"address": address, "submission_id": request["submission_id"],
                             "submissions": [*earlier, request["submission_id"]],
                             "env_vars": sorted(request["runtime_env"]["env_vars"])})
    run.event("ray_submitted", address=address, submission_id=request["submission_id"])
    run.flush()
    return run


def _record(run: RunFolder) -> dict:
    return run.read_json("run.json").get("ray") or {}


def status(run: RunFolder) -> dict:
    """run.json, with the Ray job's own view under ``ray`` (status, message) when the cluster answers."""
    info = run.read_json("run.json")
    record = info.get("ray") or {}
    if not record.get("submission_id"):
        return info
    try:
        details = _client(record["address"]).get_job_info(record["submission_id"])
    except (TargetError, RuntimeError) as exc:
        info["ray"] = {**record, "error": str(exc)}
        return info
    job_status = str(details.status.value if hasattr(details.status, "value") else details.status)
    info["ray"] = {**record, "job_status": job_status, "message": details.message}
    # The driver records its own outcome; one that died before it could (killed, out of memory, a node lost)
    # leaves only Ray's word for it.
    if info.get("state") not in TERMINAL_STATES and job_status in ("FAILED", "STOPPED", "SUCCEEDED"):
        info["state"] = "cancelled" if job_status == "STOPPED" else "failed"
        info["error"] = f"Ray job {record['submission_id']} ended {job_status} without the driver recording an " \
                        f"outcome: {details.message}"
    return info


def cancel(run: RunFolder, wait_s: float = STOP_WAIT_S) -> bool:
    """Ask Ray to stop the job (SIGTERM to the driver, which checkpoints); True if it was running."""
    record = _record(run)
    if not record.get("submission_id"):
        return False
    client = _client(record["address"])
    run.event("cancel_requested")
    stopped = client.stop_job(record["submission_id"])
    deadline = time.monotonic() + wait_s
    while not client.get_job_status(record["submission_id"]).is_terminal() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if stopped and run.read_json("run.json").get("state") not in TERMINAL_STATES:
        run.update_run_info(state="cancelled", finished_at=time.time())
        run.event("run_cancelled", target=NAME)
    run.flush()
    return bool(stopped)


def logs(run: RunFolder, write, follow: bool = False) -> None:
    """The driver's output as Ray keeps it; with ``follow``, until the job ends."""
    record = _record(run)
    if not record.get("submission_id"):
        if run.exists("logs/driver.log"):
            write(run.read_text("logs/driver.log"))
        return
    client = _client(record["address"])
    printed = 0
    while True:
        terminal = client.get_job_status(record["submission_id"]).is_terminal()
        text = client.get_job_logs(record["submission_id"])
        if len(text) > printed:
            write(text[printed:])
            printed = len(text)
        if not follow or terminal:
            return
        time.sleep(POLL_S)
