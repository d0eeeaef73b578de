"""Run state: ``run.json`` as a typed `RunInfo` with a `RunState`, read and written through this module only.

Who writes run.json, and when:

- **the submitter**, in `create_run` (every target's ``submit`` calls it first): ``job.yaml`` and run.json with
  state ``pending`` (``queued`` when `tunerun serve` holds it back until a slot frees); then the target adds its
  handle (the local driver's pid, the Slurm job id, the RayJob, the Ray submission id), or records ``failed``
  when the target refused the job. Queuing drops the previous launch's local handle: a queued run has no driver,
  and a resumed run's dead one would otherwise read as this launch's, gone without a word.
- **the service's scheduler** (`tunerun.jobs.service.scheduler`): ``failed`` when it cannot start a queued job
  (`record_refused`), ``queued`` again when a launch stopped before its driver could record anything
  (`record_requeued`).
- **the driver** (``python -m tunerun.trainer``, `tunerun.trainer.entrypoint`): ``running`` when it starts, its
  outcome when it ends: ``succeeded``, ``failed`` (with ``error`` and ``error_kind`` user|internal|disk_full),
  ``cancelled`` or ``preempted`` (stopped at a checkpoint on request; launching the run again continues it).
  On a full disk, where run.json cannot be rewritten, the outcome goes into `RESERVED_OUTCOME`, a small file the
  driver wrote at its start for this (overwriting allocated bytes needs no new space); `read_info` reads it.
- **rank 0 of the workers**: the gates' verdict (``gates``) at the final evaluation.
- **the submitter on `tunerun cancel`**: ``cancelled``, after the target confirmed the stop. This is the one
  write that can meet another (the driver recording how it went down): cancel writes after the driver is gone,
  so the user's word is the last one.

Reading never writes: `Target.status` returns run.json reconciled with the target's own view (a driver killed
outright could not record its outcome: ``error_kind`` driver_gone; Slurm requeued a preempted job; a queued run
has no driver to ask), and only the returned `RunInfo` says so.
Each write is a read-modify-write of one small object, atomic on every backend (`RunFolder.write_text`).
"""
from __future__ import annotations

import os
import shlex
import time
from enum import Enum

from pydantic import BaseModel, ConfigDict, ValidationError

from tunerun.cluster.run_folder import (CHECKPOINT_REQUEST, RESERVED_OUTCOME, RUN_INFO, RunFolder,
                                        last_complete_checkpoint, write_job)
from tunerun.cluster.space import is_disk_full
from tunerun.jobs.errors import StorageError, TargetError
from tunerun.jobs.plan import ResolvedJob

RESERVED_OUTCOME_BYTES = 16384  # set aside at the driver's start (local run folders): see record_outcome


class RunState(str, Enum):
    QUEUED = "queued"  # waiting for a slot the service gives out (tunerun serve, local target); nothing started
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """The driver is gone. A preempted run is terminal too, but resumable: the next launch continues it."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.PREEMPTED)


class Record(BaseModel):
    # Run folders outlive the tunerun that wrote them: keys this version does not know are kept, not refused.
    model_config = ConfigDict(extra="allow")


class Handle(Record):
    """A target's record of a run in run.json, under the target's name: each target module declares its own
    (`tunerun.cluster.targets.Target.Handle`) and reads it with `Target.handle`."""


class RunInfo(Record):
    """``run.json``. Only ``state`` is always there; the rest appears as the run goes (see the module doc). The
    target's record of the run lies under the target's name (``"slurm": {"job_id": …}``): each target module
    declares its `Handle`, read with `Target.handle`."""

    run_id: str | None = None
    name: str | None = None
    state: RunState = RunState.PENDING
    target: str = "local"
    method: str | None = None
    workers: int | None = None
    created_at: float | None = None
    updated_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    error_kind: str | None = None  # user | internal | disk_full; driver_gone only as `Target.status` reports it
    detail: str | None = None
    gates: dict | None = None
    versions: dict | None = None
    host: str | None = None
    mlflow_run_id: str | None = None  # tracking.mlflow: the MLflow run every launch of this run logs to
    launch: list[str] | None = None  # `tunerun run`'s job file and --set overrides: what a resume repeats

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def state_text(self) -> str:
        """The state with why it failed, when that is not the job's own doing: 'failed (disk full)'."""
        why = {"disk_full": "disk full", "driver_gone": "driver gone"}.get(self.error_kind or "")
        return f"{self.state} ({why})" if self.state == RunState.FAILED and why else str(self.state)


def read_info(run: RunFolder) -> RunInfo:
    try:
        info = RunInfo.model_validate(run.read_json(RUN_INFO))
    except (ValidationError, ValueError) as exc:  # ValueError: not JSON (edited by hand, cut off by a full disk)
        raise StorageError(f"{run.uri(RUN_INFO)} is not a readable run record: {exc}") from None
    if info.state.terminal or not run.is_local:
        return info
    outcome = _reserved_outcome(run)
    return info.model_copy(update=outcome) if outcome else info


def update_info(run: RunFolder, **fields) -> RunInfo:
    """Merge ``fields`` into run.json (``None`` clears a field) and write it back."""
    current = run.read_json(RUN_INFO) if run.exists(RUN_INFO) else {}
    merged = RunInfo.model_validate({**current, **fields, "updated_at": time.time()})
    run.write_json(RUN_INFO, merged.to_json())
    return merged


def create_run(job: ResolvedJob, target: str, resume: bool = False,
               state: RunState = RunState.PENDING, launch: list[str] | None = None) -> RunFolder:
    """Write the resolved job and the initial run.json: the run exists from here on.

    An existing run id is only taken over with ``resume`` (or by a target restarting the same job, such as a
    Slurm requeue), or when it is ``queued`` and now starts: a finished run is never overwritten by accident.
    A resumed run keeps its data and checkpoints: training continues from the newest complete one.
    """
    if job.spec.storage.is_s3:
        from tunerun.cluster.s3 import check_access

        check_access(job.spec.storage)  # bad credentials or a missing bucket fail here, before anything starts
    run = RunFolder(job.spec.storage, job.run_id)
    earlier = read_info(run).state if run.exists(RUN_INFO) else None
    _check_takeover(run, job, earlier, resume)
    release_reserved_outcome(run)  # a resumed run's earlier outcome: this launch records its own
    write_job(run, job)
    # Only the local target queues; the handle it would keep is the previous launch's driver (see the module doc).
    dropped = {"local": None} if state == RunState.QUEUED else {}
    update_info(run, run_id=job.run_id, name=job.spec.name, state=state, target=target,
                method=job.spec.method.kind, workers=job.spec.resources.num_workers, error=None, error_kind=None,
                **({"created_at": time.time()} if earlier is None else {}), **({"launch": launch} if launch else {}),
                **dropped)
    if earlier is None:
        event = "run_queued" if state == RunState.QUEUED else "run_created"
    else:
        event = "run_dequeued" if earlier == RunState.QUEUED else "run_resumed"
    run.event(event, target=target)
    run.flush()
    return run


def _check_takeover(run: RunFolder, job: ResolvedJob, earlier: RunState | None, resume: bool) -> None:
    where = job.spec.storage.uri
    if earlier == RunState.QUEUED:
        return  # it never ran: it starts now
    if earlier is None:
        if resume:
            raise TargetError(f"--resume {job.run_id}: no such run in {where}")
        return
    if not resume:
        raise TargetError(f"run {job.run_id} already exists in {where} (state {earlier}); continue it with "
                          f"--resume {job.run_id}, or choose another --run-id")
    from tunerun.cluster.targets import for_run

    if not for_run(run).status(run).state.terminal:
        raise TargetError(f"run {job.run_id} is still running; cancel it first (tunerun cancel {job.run_id})")


def record_outcome(run: RunFolder, state: RunState, **fields) -> RunInfo:
    """The driver's last word: the state it ended in, when, and why (``error``, ``error_kind``, ``detail``).

    On a full disk it goes into the reserved file instead; an OSError leaves only when that failed too."""
    try:
        info = update_info(run, state=state, finished_at=time.time(), **fields)
    except OSError as exc:
        if not is_disk_full(exc) or not _write_reserved_outcome(run, state, fields):
            raise
        return read_info(run)
    try:
        run.event(f"run_{state}", **fields)
        run.flush()
    except OSError as exc:  # run.json has the outcome: the event line is a copy of it
        if not is_disk_full(exc):
            raise
    release_reserved_outcome(run)
    return info


def reserve_outcome_space(run: RunFolder) -> None:
    """Set aside `RESERVED_OUTCOME_BYTES` in the run folder (local folders: object stores do not fill up)."""
    if run.is_local:
        run.write_text(RESERVED_OUTCOME, " " * RESERVED_OUTCOME_BYTES)


def release_reserved_outcome(run: RunFolder) -> None:
    if run.is_local and run.exists(RESERVED_OUTCOME):
        run.delete(RESERVED_OUTCOME)


def _write_reserved_outcome(run: RunFolder, state: RunState, fields: dict) -> bool:
    """Overwrite the reserved file in place with the outcome (padded to its size: no new blocks are needed)."""
    if not run.is_local or not run.exists(RESERVED_OUTCOME):
        return False
    outcome = {"state": str(state), "finished_at": time.time(), **fields}
    data = RunInfo.model_validate(outcome).model_dump_json(include=set(outcome)).encode("utf-8")
    if len(data) > RESERVED_OUTCOME_BYTES and "error" in fields:  # a long error: keep its end, the exception
        outcome["error"] = str(fields["error"])[-(RESERVED_OUTCOME_BYTES // 2):]
        data = RunInfo.model_validate(outcome).model_dump_json(include=set(outcome)).encode("utf-8")
    try:
        with open(run.local_path(RESERVED_OUTCOME), "r+b") as handle:
            handle.write(data[:RESERVED_OUTCOME_BYTES].ljust(RESERVED_OUTCOME_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        return False
    return True


def _reserved_outcome(run: RunFolder) -> dict | None:
    """The outcome the driver wrote into the reserved file (None while it only holds the reserved bytes)."""
    try:
        with open(run.local_path(RESERVED_OUTCOME), "rb") as handle:
            if handle.read(1) != b"{":
                return None
            data = b"{" + handle.read()
    except OSError:
        return None
    try:
        return RunInfo.model_validate_json(data.strip()).model_dump(exclude_unset=True)
    except ValidationError:
        return None


def disk_full_message(run: RunFolder, what: str) -> str:
    """``disk full: <what>``, then what survived and the exact command that continues the run once there is room."""
    last = last_complete_checkpoint(run)
    kept = f"the last complete checkpoint is {run.uri(last)}" if last else "no checkpoint was complete yet"
    return (f"disk full: {what}; {kept}. Free space on that filesystem, or copy the run folder {run.uri()} to a "
            f"larger disk, then continue with: {resume_command(run, read_info(run))} (with --storage naming the "
            "folder you copied it into)")


def resume_command(run: RunFolder, info: RunInfo, storage: str | None = None) -> str:
    """The `tunerun run … --resume` that continues ``run``: the job file and --set overrides it was launched
    with (``JOB`` when they were not recorded), and ``storage`` if the run folder moved there."""
    job_file, *overrides = info.launch or ["JOB"]
    words = ["tunerun", "run", job_file, *[w for o in overrides for w in ("--set", o)], "--resume", run.run_id,
             "--storage", storage or run.storage.uri]
    return shlex.join(words)


def record_refused(run: RunFolder, error: str, error_kind: str = "user", **fields) -> None:
    """The target would not take the job (sbatch, the Ray cluster or the Kubernetes API said no), or the service
    could not start it (``error_kind`` internal: a job.yaml another tunerun wrote, a launch that raised)."""
    update_info(run, state=RunState.FAILED, error=error, error_kind=error_kind, finished_at=time.time(), **fields)
    run.event("run_failed", error=error)
    run.flush()


def record_requeued(run: RunFolder, reason: str) -> None:
    """A launch stopped between leaving ``queued`` and recording its driver (the server died, the disk filled):
    nothing trains, so the run waits for a slot again."""
    update_info(run, state=RunState.QUEUED, local=None, error=None, error_kind=None)
    run.event("run_queued", reason=reason)
    run.flush()


def record_cancelled(run: RunFolder, target: str) -> None:
    """The user asked for the run to end, and the target stopped it: whatever the driver recorded while it
    went down (preempted by the SIGTERM, failed), it ends as cancelled. A run that had already succeeded
    stays succeeded."""
    if read_info(run).state != RunState.SUCCEEDED:
        update_info(run, state=RunState.CANCELLED, finished_at=time.time(), error=None, error_kind=None)
        run.event("run_cancelled", target=target)
    run.flush()


def request_checkpoint_and_stop(run: RunFolder, reason: str) -> None:
    """Ask a running run to write a checkpoint and stop (it then ends ``preempted``; launching it again with
    ``resume`` continues from that checkpoint). Written once: the first request's reason is the one kept."""
    if not run.exists(CHECKPOINT_REQUEST):
        run.write_json(CHECKPOINT_REQUEST, {"signal": reason, "time": time.time()})
        run.event("checkpoint_and_stop_requested", reason=reason)
        run.flush()
