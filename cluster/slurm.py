"""The `slurm` target: render an sbatch script from `slurm/train.sbatch.j2`, submit it, follow and cancel it.

`render_sbatch` is pure (a resolved job in, script text out). Values that sbatch reads from ``#SBATCH`` lines were
checked against strict patterns by the spec; values that reach the shell are quoted with `shlex.quote`;
spec strings cannot hold newlines (the loader refuses control characters), so none can start a new line.
S3 credentials travel by name in ``--export``, never by value.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import jinja2
from pydantic import Field, field_validator, model_validator

from tunerun.cluster.run_folder import SBATCH_SCRIPT, RunFolder
from tunerun.cluster.runs import Handle, RunInfo, RunState, create_run, record_refused, update_info
from tunerun.cluster.targets import Observation, Target, tail_file, trainer_shell_command, wait_until
from tunerun.jobs.errors import TargetError
from tunerun.jobs.plan import TUNERUN_VERSION, ResolvedJob
from tunerun.jobs.spec import ENV_NAME, Strict, field_error, os_path

# slurm/ maps to the package tunerun.slurm: a sibling of this package both in the repository and installed.
TEMPLATES = Path(__file__).resolve().parent.parent / "slurm"
# Exported by name when set in the submitting shell; their values never appear in the script.
BASE_EXPORTS = ("PATH", "HOME", "LANG", "USER", "TUNERUN_CACHE", "HF_HOME", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE",
                "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS",
                # tracking.mlflow: the standard MLflow credential variables, by name like the AWS ones
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SLURM_ACTIVE = {"PENDING": RunState.PENDING, "CONFIGURING": RunState.PENDING, "REQUEUED": RunState.PENDING,
                "REQUEUE_HOLD": RunState.PENDING, "RUNNING": RunState.RUNNING, "COMPLETING": RunState.RUNNING,
                "SUSPENDED": RunState.RUNNING, "RESIZING": RunState.RUNNING}
CANCEL_GRACE_S = 60.0
# squeue's reason (%r) for a pending job, in words a team can act on; the Assoc*/QOS* limits not named here are
# explained by their prefix (`pending_reason`). Slurm's full list: squeue(1), JOB REASON CODES.
PENDING_REASONS = {
    "Priority": "waiting behind higher-priority jobs in the partition",
    "Resources": "waiting for free nodes, CPUs or GPUs in the partition",
    "Dependency": "waiting for the jobs it depends on",
    "BeginTime": "waiting for its start time",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows a job",
    "PartitionTimeLimit": "its time limit is above the partition's",
    "ReqNodeNotAvail": "the nodes it needs are not available (down, drained or reserved)",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "QOSMaxJobsPerUserLimit": "waiting for the QOS's limit on running jobs per user",
    "QOSMaxGRESPerUser": "waiting for the QOS's GPU limit per user",
    "QOSGrpGRES": "waiting for the QOS's GPU limit",
    "QOSGrpCpuLimit": "waiting for the QOS's CPU limit",
    "QOSGrpJobsLimit": "waiting for the QOS's limit on running jobs",
    "AssocGrpGRES": "waiting for the account's GPU limit",
    "AssocGrpCpuLimit": "waiting for the account's CPU limit",
    "AssocGrpJobsLimit": "waiting for the account's limit on running jobs",
    "AssocMaxJobsLimit": "waiting for the account's limit on running jobs per user",
}


SLURM_WORD = r"^[A-Za-z0-9_.,+-]{1,64}$"  # partition/account/qos: values sbatch reads, never a shell


def slurm_word(value: str | None) -> str | None:
    """A partition, account or QOS name as it may stand on an ``#SBATCH`` line (`SLURM_WORD`)."""
    if value is not None and not re.fullmatch(SLURM_WORD, value):
        raise ValueError(f"{value[:70]!r} cannot stand on an #SBATCH line: expected up to 64 letters, digits, '_', "
                         "'.', ',', '+' or '-' (no spaces, quotes or '$'), as `sacctmgr show account/qos` and "
                         "`sinfo` name them")
    return value


class SlurmSettings(Strict):
    """`targets.slurm`: the sbatch script's resources and what runs before Ray starts on each node."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = Field("04:00:00", pattern=r"^(\d{1,3}-)?\d{1,3}(:\d{2}){0,2}$")
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$")
    exclusive: bool = False
    requeue: bool = True
    signal_seconds: int = Field(120, ge=0, le=3600)  # USR1 this long before the time limit: checkpoint, requeue
    setup: list[str] = []  # shell lines run before Ray starts (module load …, source venv/bin/activate)
    python: str = Field("python3", pattern=r"^[A-Za-z0-9_./+~-]+$")  # the interpreter on the compute nodes
    export: list[str] = []  # extra environment variable names passed to the job (by name, never by value)
    log_dir: str = Field("./slurm-logs", pattern=r"^[A-Za-z0-9_./~-]+$")
    ray_port_min: int = Field(20000, ge=1024, le=65000)
    ray_port_max: int = Field(29999, ge=1024, le=65534)
    network_interface: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,15}$")
    join_timeout_s: int = Field(300, ge=10)

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_word(cls, v: str | None) -> str | None:
        return slurm_word(v)

    @field_validator("log_dir")
    @classmethod
    def _os_accepts(cls, v: str) -> str:
        return os_path(v, room=len("/tunerun-job-4294967295.out") + 40)

    @field_validator("export")
    @classmethod
    def _variable_names(cls, names: list[str]) -> list[str]:
        bad = [n for n in names if not ENV_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))} "
                             "(export passes variables by name; values never go into the script)")
        return names

    @model_validator(mode="after")
    def _port_range(self):
        if self.ray_port_max - self.ray_port_min < 100:
            raise field_error("ray_port_max", "must leave at least 100 ports above ray_port_min "
                              f"(got {self.ray_port_min}–{self.ray_port_max})")
        return self


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def render_sbatch(job: ResolvedJob) -> str:
    spec, slurm = job.spec, SlurmTarget.settings(job.spec)
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
        python=slurm.python,
        trainer_command=trainer_shell_command(job, python=slurm.python),
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


def pending_reason(reason: str | None) -> str | None:
    """squeue's reason for a pending job, explained (None when there is none to give: ``None``, empty)."""
    if not reason or reason in ("None", "(null)"):
        return None
    if reason in PENDING_REASONS:
        return f"{PENDING_REASONS[reason]} (Slurm: {reason})"
    owner = "the account's" if reason.startswith("Assoc") else "the QOS's" if reason.startswith("QOS") else None
    return f"waiting for {owner} limit (Slurm: {reason})" if owner else f"pending in Slurm: {reason}"


def slurm_view(job_id: str) -> tuple[str | None, str | None]:
    """(state, reason) as Slurm sees the job: squeue, then scontrol for recently ended jobs; (None, None) when it
    no longer knows the job. The reason is squeue's (%r): why a pending job waits."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout
        if out.strip():
            state, _, reason = out.strip().splitlines()[0].partition("|")
            return state, reason or None
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise TargetError("squeue is not on PATH: ask Slurm from a login node of the cluster") from None
    for field in shown.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1], None
    return None, None


def slurm_state(job_id: str) -> str | None:
    """Slurm's own view of the job's state (`slurm_view`)."""
    return slurm_view(job_id)[0]


class SlurmHandle(Handle):
    job_id: str
    script: str | None = None  # the sbatch script, relative to the run folder
    output: str | None = None  # the job's output file where the submitting machine sees it
    state: str | None = None  # observed by `status`: squeue / scontrol, None once Slurm forgot the job
    reason: str | None = None  # observed: squeue's reason for a pending job (Priority, Resources, AssocGrpGRES…)


class SlurmTarget(Target):
    name = "slurm"
    Handle = SlurmHandle
    Settings = SlurmSettings

    def render(self, job: ResolvedJob) -> str:
        return render_sbatch(job)

    def submit(self, job: ResolvedJob, resume: bool = False) -> RunFolder:
        script = render_sbatch(job)
        run = create_run(job, self.name, resume)
        run.write_text(SBATCH_SCRIPT, script)
        log_dir = Path(self.settings(job.spec).log_dir).expanduser().absolute()
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True,
                                    timeout=60)
        except FileNotFoundError:
            raise TargetError("sbatch is not on PATH: run this on a Slurm login node") from None
        if result.returncode != 0:
            record_refused(run, f"sbatch refused the job: {result.stderr.strip()}")
            raise TargetError(f"sbatch refused the job: {result.stderr.strip()}")
        job_id = result.stdout.strip().split(";")[0]
        output = log_dir / f"{job.spec.name}-{job_id}.out"
        update_info(run, **{self.name: {"job_id": job_id, "script": SBATCH_SCRIPT, "output": str(output)}})
        run.event("slurm_submitted", job_id=job_id)
        run.flush()
        return run

    def observe(self, info: RunInfo) -> Observation | None:
        handle = self.handle(info)
        try:
            state, reason = slurm_view(handle.job_id)
        except TargetError:  # not on a Slurm host: the run folder is all there is
            return None
        reason = reason if state == "PENDING" else None  # a running job's reason is "None"
        handle = handle.model_copy(update={"state": state, "reason": reason})
        # A preempted run that Slurm requeued is pending or running again.
        return Observation(handle, active=SLURM_ACTIVE.get(state), ended=state is not None and state not in SLURM_ACTIVE,
                           error=f"Slurm job {handle.job_id} ended {state} without recording an outcome; "
                                 "see the job's output", waiting=pending_reason(reason))

    def stop(self, info: RunInfo) -> bool:
        job_id = self.handle(info).job_id
        if slurm_state(job_id) not in SLURM_ACTIVE:
            return False
        subprocess.run(["scancel", job_id], check=False, capture_output=True)
        wait_until(lambda: slurm_state(job_id) not in SLURM_ACTIVE, CANCEL_GRACE_S, 1.0)
        return True

    def describe(self, info: RunInfo) -> str:
        return f"Slurm job {self.handle(info).job_id}"

    def view(self, info: RunInfo) -> str | None:
        handle = self.handle(info)
        if handle is None:
            return None
        waiting = pending_reason(handle.reason)
        return f"Slurm job {handle.job_id}: {handle.state or 'no longer known to Slurm'}" + (
            f" — {waiting}" if waiting else "")

    def logs(self, run: RunFolder, write, follow: bool = False) -> None:
        """The job's output file where this machine sees it (a shared filesystem), else the copy in the run folder."""
        handle = self.handle(self.status(run))
        output = Path(handle.output) if handle and handle.output else None
        if output is None or not output.is_file():
            super().logs(run, write, follow)
            return
        tail_file(output, write, follow, done=lambda: self.status(run).state.terminal)
