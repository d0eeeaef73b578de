"""The `slurm` target: render an sbatch script from `slurm/train.sbatch.j2`, submit it, follow and cancel it.

`render` is pure (a resolved job in, script text out). Values that sbatch reads from ``#SBATCH`` lines were
checked against strict patterns by the spec; values that reach the shell are quoted with `shlex.quote`;
spec strings cannot hold newlines (the loader refuses control characters), so none can start a new line.
S3 credentials travel by name in ``--export``, never by value.
"""
from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import jinja2

from tunerun.cluster.local import create_run
from tunerun.cluster.storage import TERMINAL_STATES, RunFolder
from tunerun.jobs.errors import TargetError
from tunerun.jobs.plan import TUNERUN_VERSION, ResolvedJob

NAME = "slurm"
# slurm/ maps to the package tunerun.slurm: a sibling of this package both in the repository and installed.
TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
# Exported by name when set in the submitting shell; their values never appear in the script.
BASE_EXPORTS = ("PATH", "HOME", "LANG", "USER", "TUNERUN_CACHE", "HF_HOME", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE",
                "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS")
SLURM_ACTIVE = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
                "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "RESIZING": "running"}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def render(job: ResolvedJob) -> str:
    spec, slurm = job.spec, job.spec.targets.slurm
    resources = spec.resources
    cpus_per_task = resources.workers_per_node * resources.cpus_per_worker
    script = _environment().get_template("train.sbatch.j2").render(
        version=TUNERUN_VERSION,
        run_id=job.run_id,
        job_name=spec.name,
        nodes=resources.nodes,
        cpus_per_task=cpus_per_task,
        # Logical CPUs for exactly this node's workers (the driver and Ray Train's controller take none): Ray
        # Train packs workers, so any spare CPU on the head would draw another node's worker onto it.
        ray_cpus=cpus_per_task,
        gpus_per_node=resources.workers_per_node * resources.gpus_per_worker,
        mem=slurm.mem, time=slurm.time, partition=slurm.partition, account=slurm.account, qos=slurm.qos,
        exclusive=slurm.exclusive, requeue=slurm.requeue, signal_seconds=slurm.signal_seconds,
        log_dir=str(Path(slurm.log_dir).expanduser().absolute()),
        export=",".join(dict.fromkeys([*BASE_EXPORTS, *slurm.export])),
        setup=slurm.setup,
        run_uri=f"{spec.storage.uri.rstrip('/')}/{job.run_id}",
        endpoint_url=spec.storage.endpoint_url,
        python=slurm.python,
        port_min=slurm.ray_port_min,
        port_span=slurm.ray_port_max - slurm.ray_port_min - 3,  # PORT..PORT+3 stay inside the range
        interface=slurm.network_interface,
        join_timeout=slurm.join_timeout_s,
    )
    _check_rendered(script)
    return script


def _check_rendered(script: str) -> None:
    """Parse what was rendered back: bash must accept it, and every #SBATCH line must be one option."""
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise TargetError(f"the rendered sbatch script does not parse: {result.stderr.strip()}")
    for line in script.splitlines():
        if line.startswith("#SBATCH") and len(line.split()) != 2:
            raise TargetError(f"rendered an invalid sbatch directive: {line!r}")


def submit(job: ResolvedJob, resume: bool = False) -> RunFolder:
    script = render(job)
    run = create_run(job, NAME, resume)
    run.write_text("slurm/train.sbatch", script)
    Path(job.spec.targets.slurm.log_dir).expanduser().absolute().mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise TargetError("sbatch is not on PATH: run this on a Slurm login node") from None
    if result.returncode != 0:
        run.update_run_info(state="failed", error=f"sbatch refused the job: {result.stderr.strip()}",
                            error_kind="user")
        raise TargetError(f"sbatch refused the job: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    output = Path(job.spec.targets.slurm.log_dir).expanduser().absolute() / f"{job.spec.name}-{job_id}.out"
    run.update_run_info(slurm={"job_id": job_id, "script": "slurm/train.sbatch", "output": str(output)})
    run.event("slurm_submitted", job_id=job_id)
    run.flush()
    return run


def slurm_state(job_id: str) -> str | None:
    """Slurm's own view (squeue, then scontrol for recently ended jobs); None when it no longer knows the job."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if out:
        return out.splitlines()[0]
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    for field in shown.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def status(run: RunFolder) -> dict:
    info = run.read_json("run.json")
    job_id = (info.get("slurm") or {}).get("job_id")
    if not job_id:
        return info
    state = slurm_state(job_id)
    info["slurm"]["state"] = state
    resumable = info.get("state") not in TERMINAL_STATES or info.get("state") == "preempted"
    if resumable and state in SLURM_ACTIVE:  # a preempted run that Slurm requeued is pending/running again
        info["state"] = SLURM_ACTIVE[state]
    elif info.get("state") not in TERMINAL_STATES and state is not None and state not in SLURM_ACTIVE:
        info["state"] = "failed"
        info["error"] = f"Slurm job {job_id} ended {state} without recording an outcome; see the job's output"
    return info


def cancel(run: RunFolder, grace_s: float = 60.0) -> bool:
    info = run.read_json("run.json")
    job_id = (info.get("slurm") or {}).get("job_id")
    if not job_id or slurm_state(job_id) not in SLURM_ACTIVE:
        return False
    run.event("cancel_requested", job_id=job_id)
    subprocess.run(["scancel", job_id], check=False, capture_output=True)
    deadline = time.monotonic() + grace_s
    while slurm_state(job_id) in SLURM_ACTIVE and time.monotonic() < deadline:
        time.sleep(1)
    run.update_run_info(state="cancelled", finished_at=time.time(), error=None, error_kind=None)
    run.event("run_cancelled")
    run.flush()
    return True


def logs(run: RunFolder, write, follow: bool = False) -> None:
    """The job's output file where this machine sees it (a shared filesystem), else the copy in the run folder."""
    output = Path((run.read_json("run.json").get("slurm") or {}).get("output") or "/nonexistent")
    if not output.is_file():
        if run.exists("logs/driver.log"):
            write(run.read_text("logs/driver.log"))
        return
    offset = 0
    while True:
        with output.open(encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            write(handle.read())
            offset = handle.tell()
        if not follow or status(run).get("state") in TERMINAL_STATES:
            return
        time.sleep(1.0)
