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
import re
import time

import yaml
from pydantic import field_validator

from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.runs import Handle, RunInfo, RunState, create_run, read_info, record_refused, update_info
from tunerun.cluster.targets import Observation, Target, trainer_shell_command, wait_until
from tunerun.jobs.errors import TargetError
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.spec import ENV_NAME, HTTP_ADDRESS, Strict

POLL_S = 1.0
STOP_WAIT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S; the driver checkpoints meanwhile
ENDED = ("FAILED", "STOPPED", "SUCCEEDED")


class RayClusterSettings(Strict):
    """An existing Ray cluster reached through its Job Submission API (`--target ray`)."""

    address: str = "http://127.0.0.1:8265"  # the dashboard's HTTP address (or RAY_ADDRESS)
    env_vars: list[str] = []  # names of variables copied from the submitting shell into the job's runtime_env
    pip: list[str] = []  # packages Ray installs for the job; [] = tunerun is installed on the cluster

    @field_validator("address")
    @classmethod
    def _http(cls, v: str) -> str:
        if not HTTP_ADDRESS.fullmatch(v):
            raise ValueError(f"{v!r}: expected the Ray dashboard's HTTP address, e.g. http://head:8265 "
                             "(ray:// is Ray Client, not the Job Submission API)")
        return v

    @field_validator("env_vars")
    @classmethod
    def _non_secret_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            # runtime_env variables are shown in the Ray dashboard to anyone who can open it
            if re.search(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY", name, re.I):
                raise ValueError(f"{name} looks like a credential: the Ray dashboard shows a job's runtime_env to "
                                 "anyone who can open it; give the cluster its own credentials instead (the "
                                 "environment `ray start` ran in, an instance role, or ~/.aws on every node)")
        return v


def submission(job: ResolvedJob, attempt: int = 1, environ: dict | None = None) -> dict:
    """What `submit` sends to the Job Submission API (``attempt`` > 1 for a resumed run: ids are single-use)."""
    environ = os.environ if environ is None else environ
    target = RayClusterTarget.settings(job.spec)
    runtime_env: dict = {"env_vars": {name: environ[name] for name in target.env_vars if name in environ}}
    if target.pip:
        runtime_env["pip"] = list(target.pip)
    return {
        "address": target.address,
        "submission_id": f"tunerun-{job.run_id}" + (f"-{attempt}" if attempt > 1 else ""),
        "entrypoint": trainer_shell_command(job),
        "runtime_env": runtime_env,
        "metadata": {"tunerun_run_id": job.run_id, "tunerun_run_uri": job.run_uri},
    }


def render_request(job: ResolvedJob) -> str:
    """The submission request as YAML (pure apart from reading the named variables' values)."""
    request = submission(job)
    missing = [name for name in RayClusterTarget.settings(job.spec).env_vars if name not in request["runtime_env"]["env_vars"]]
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


class RaySubmission(Handle):
    """A job on an existing Ray cluster, through its Job Submission API."""

    address: str
    submission_id: str
    submissions: list[str] = []  # every id this run was submitted under (a resumed run gets a new one)
    env_vars: list[str] = []  # names copied from the submitting shell (values never recorded)
    job_status: str | None = None  # observed by `status`
    message: str | None = None
    error: str | None = None  # the API could not be asked


class RayClusterTarget(Target):
    name = "ray"
    Handle = RaySubmission
    Settings = RayClusterSettings
    address_setting = "address"

    def render(self, job: ResolvedJob) -> str:
        return render_request(job)

    def submit(self, job: ResolvedJob, resume: bool = False) -> RunFolder:
        address = self.settings(job.spec).address
        client = _client(address)  # before the run folder exists: a wrong address leaves nothing behind
        run = create_run(job, self.name, resume)
        earlier = handle.submissions if (handle := self.handle(read_info(run))) else []
        request = submission(job, attempt=len(earlier) + 1)
        try:
            client.submit_job(entrypoint=request["entrypoint"], submission_id=request["submission_id"],
                              runtime_env=request["runtime_env"], metadata=request["metadata"])
        except (RuntimeError, ConnectionError, ValueError) as exc:
            record_refused(run, f"Ray refused the job: {exc}")
            raise TargetError(f"the Ray cluster at {address} refused the job: {exc}") from None
        handle = RaySubmission(address=address, submission_id=request["submission_id"],
                               submissions=[*earlier, request["submission_id"]],
                               env_vars=sorted(request["runtime_env"]["env_vars"]))
        update_info(run, **{self.name: handle.model_dump(exclude_none=True)})
        run.event("ray_submitted", address=address, submission_id=request["submission_id"])
        run.flush()
        return run

    def observe(self, info: RunInfo) -> Observation:
        handle = self.handle(info)
        try:
            details = _client(handle.address).get_job_info(handle.submission_id)
        except (TargetError, RuntimeError) as exc:
            return Observation(handle.model_copy(update={"error": str(exc)}))
        job_status = str(details.status.value if hasattr(details.status, "value") else details.status)
        return Observation(handle.model_copy(update={"job_status": job_status, "message": details.message}),
                           ended=job_status in ENDED,
                           ended_as=RunState.CANCELLED if job_status == "STOPPED" else RunState.FAILED,
                           error=f"Ray job {handle.submission_id} ended {job_status} without the driver recording "
                                 f"an outcome: {details.message}")

    def stop(self, info: RunInfo) -> bool:
        """Ask Ray to stop the job (SIGTERM to the driver, which checkpoints); True if it was running."""
        handle = self.handle(info)
        client, submission_id = _client(handle.address), handle.submission_id
        stopped = client.stop_job(submission_id)
        wait_until(lambda: client.get_job_status(submission_id).is_terminal(), STOP_WAIT_S, POLL_S)
        return bool(stopped)

    def describe(self, info: RunInfo) -> str:
        handle = self.handle(info)
        return f"Ray job {handle.submission_id} at {handle.address}"

    def view(self, info: RunInfo) -> str | None:
        ray = self.handle(info)
        if ray is None:
            return None
        if ray.error:
            return f"Ray job {ray.submission_id} at {ray.address}: not readable ({ray.error})"
        return f"Ray job {ray.submission_id} at {ray.address}: {ray.job_status or '?'}" + \
            (f" ({ray.message})" if ray.message else "")

    def logs(self, run: RunFolder, write, follow: bool = False) -> None:
        """The driver's output as Ray keeps it; with ``follow``, until the job ends."""
        handle = self.handle(read_info(run))
        if handle is None:
            super().logs(run, write, follow)
            return
        client, submission_id = _client(handle.address), handle.submission_id
        printed = 0
        while True:
            terminal = client.get_job_status(submission_id).is_terminal()
            text = client.get_job_logs(submission_id)
            if len(text) > printed:
                write(text[printed:])
                printed = len(text)
            if not follow or terminal:
                return
            time.sleep(POLL_S)
