"""Launch targets: the contract every target fulfils, and the one registry the CLI (and the service) use.

A target is one module in ``cluster/`` with one `Target` subclass (submitit's ``Executor`` and SkyPilot's
``Backend`` are the model): ``render`` (pure: what the target would be given), ``submit`` (start the run,
record the target's handle in run.json), ``status`` (run.json reconciled with the target's own view),
``cancel`` and ``logs``. The class names its ``Handle`` (its record of a run in run.json) and its ``Settings``
(its block of the spec, ``targets.<name>``): the spec, run info, the server's config and the CLI find both
here. Adding a target is one module, its templates, its tests and one line in `REGISTRY`; nothing in the CLI
changes. Modules load on demand, so ``ray`` and ``kubernetes`` are imported only when used.

Whatever the target, the process it starts is the same: `trainer_command`.
"""
from __future__ import annotations

import functools
import importlib
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, create_model

from tunerun.cluster import space
from tunerun.cluster.run_folder import DRIVER_LOG, RunFolder, events, last_complete_checkpoint, read_job
from tunerun.cluster.runs import (Handle, RunInfo, RunState, disk_full_message, read_info, record_cancelled,
                                  request_checkpoint_and_stop, resume_command)
from tunerun.jobs.errors import StorageError, TargetError
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.spec import JobSpec, Strict
from tunerun.jobs.tracking import end_mlflow_run

# Ended for good: nothing the target does changes them (a preempted run may be requeued, so it is not here).
FINISHED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
# The event that says why a run still waits in its target's queue (a Slurm pending reason, Kueue's condition).
WAITING_EVENT = "run_waiting"
# name → "module:class"; the order is the order `--target` lists them in.
REGISTRY = {
    "local": "tunerun.cluster.local:LocalTarget",
    "ray": "tunerun.cluster.ray_cluster:RayClusterTarget",
    "slurm": "tunerun.cluster.slurm:SlurmTarget",
    "k8s": "tunerun.cluster.k8s:KubeRayTarget",
}


def trainer_command(job: ResolvedJob, python: str = "python") -> list[str]:
    """The one entrypoint every target ends in: ``python -m tunerun.trainer <run-uri> [--endpoint-url …]``.

    The trainer learns the spec's storage settings from job.yaml, which it must first read from the store: what
    that read needs (the endpoint, a private CA, TLS verification, addressing; never credentials) comes along
    here, only where it differs from the defaults."""
    storage = job.spec.storage
    command = [python, "-m", "tunerun.trainer", job.run_uri]
    if storage.endpoint_url:
        command += ["--endpoint-url", storage.endpoint_url]
    if storage.ca_bundle:
        command += ["--ca-bundle", storage.ca_bundle]
    if not storage.verify_tls:
        command += ["--no-verify-tls"]
    if storage.addressing_style != "auto":
        command += ["--addressing-style", storage.addressing_style]
    return command


def trainer_shell_command(job: ResolvedJob, python: str = "python") -> str:
    return shlex.join(trainer_command(job, python))


@dataclass(frozen=True)
class Observation:
    """What a target saw of a run: its handle with the observed fields filled in, and what that means for the
    run's state. ``ended``: the target says the driver is gone (``ended_as`` is then the state the run is in if
    the driver recorded nothing, with ``error`` saying why); ``active``: the target runs it again (a Slurm
    requeue after preemption); ``waiting``: why the target has not started it yet, in words a user can act on."""

    handle: BaseModel
    ended: bool = False
    ended_as: RunState = RunState.FAILED
    error: str | None = None
    active: RunState | None = None
    waiting: str | None = None


class Target(ABC):
    name: ClassVar[str]  # also the key of this target's record of a run in run.json
    Handle: ClassVar[type[Handle]]  # that record
    # The target's block of the spec, `targets.<name>` (None: it has no settings). Checked when the CLI or the
    # service loads a job (`job_model`); the job holds it as plain data, which `settings` reads.
    Settings: ClassVar[type[Strict] | None] = None
    address_setting: ClassVar[str | None] = None  # the setting `tunerun submit --address` fills in, if any

    @classmethod
    def settings(cls, spec: JobSpec) -> Strict:
        """This target's settings in ``spec``, defaults filled in."""
        return cls.Settings.model_validate(spec.targets.get(cls.name, {}))

    def handle(self, info: RunInfo) -> Handle | None:
        """This target's record of the run in ``info`` (None before the target took the run)."""
        raw = (info.model_extra or {}).get(self.name)
        return raw if raw is None or isinstance(raw, Handle) else self.Handle.model_validate(raw)

    def render(self, job: ResolvedJob) -> str:
        """What the target would be given (a script, manifests, a request), submitting nothing. Pure."""
        raise TargetError(f"target {self.name} has nothing to render: it starts the trainer entrypoint directly "
                          f"({trainer_shell_command(job)})")

    @abstractmethod
    def submit(self, job: ResolvedJob, resume: bool = False) -> RunFolder:
        """Start the run (``resume``: continue an existing run id); its run folder records the handle."""

    @abstractmethod
    def observe(self, info: RunInfo) -> Observation | None:
        """The target's own view of the run with this handle, or None when there is nothing to ask."""

    @abstractmethod
    def stop(self, info: RunInfo) -> bool:
        """Ask the target to stop the run and wait (bounded) until it has; True if something was running."""

    def describe(self, info: RunInfo) -> str:
        """The handle in a few words: 'Slurm job 48211'."""
        return self.name

    def view(self, info: RunInfo) -> str | None:
        """One line of the target's own view (as `status` observed it), if it has one."""
        return None

    def status(self, run: RunFolder, info: RunInfo | None = None, ask_finished: bool = True) -> RunInfo:
        """run.json (or ``info``, read from it just now) reconciled with the target's own view. With
        ``ask_finished=False`` a run that ended succeeded, failed or cancelled is what its driver (or its canceller)
        recorded, and the target is not asked: a page of finished jobs would otherwise cost a Kubernetes API call,
        or squeue and scontrol, per job to learn nothing new. A preempted run is asked all the same: Slurm may have
        requeued it. `tunerun status` asks, to show the target's own last word on the run."""
        info = read_info(run) if info is None else info
        # A queued run has no driver yet: a handle there is an earlier launch's, whose driver is gone by design.
        if info.state == RunState.QUEUED or self.handle(info) is None or (
                not ask_finished and info.state in FINISHED):
            return info
        seen = self.observe(info)
        if seen is None:
            return info
        if seen.waiting and not info.state.terminal:
            note_waiting(run, self.name, seen.waiting)
        info = info.model_copy(update={self.name: seen.handle})
        if seen.active is not None and (not info.state.terminal or info.state == RunState.PREEMPTED):
            return info.model_copy(update={"state": seen.active})
        if seen.ended and not info.state.terminal:
            # The driver records its own outcome; one that died before it could (killed, out of memory, a node
            # lost, an image never pulled) leaves only the target's word for it.
            return info.model_copy(update=unrecorded_end(run, info, seen))
        return info

    def cancel(self, run: RunFolder, warn: Callable[[str], None] = lambda message: None) -> bool:
        """Stop a running run; its checkpoints stay. True if something was running. A tracked run's MLflow run
        ends KILLED here, whoever cancels (the CLI, the service): the target may have stopped the driver before
        it could close it. ``warn`` hears when that failed; the run is cancelled all the same."""
        info = read_info(run)
        if self.handle(info) is None:
            return False
        run.event("cancel_requested", target=self.name)
        stopped = self.stop(info)
        if stopped:
            record_cancelled(run, self.name)
            if problem := _end_cancelled_mlflow_run(run):
                run.event("mlflow_run_not_killed", mlflow_run_id=info.mlflow_run_id, error=problem)
                warn(f"MLflow run {info.mlflow_run_id} not marked KILLED: {problem}")
        run.flush()
        return stopped

    def pause(self, run: RunFolder) -> bool:
        """Checkpoint and stop, through the run folder (the workers poll it on every target): the run ends
        ``preempted`` and ``submit(job, resume=True)`` continues it. True if it was running."""
        if self.status(run).state != RunState.RUNNING:
            return False
        request_checkpoint_and_stop(run, "pause")
        return True

    def logs(self, run: RunFolder, write: Callable[[str], None], follow: bool = False) -> None:
        """The driver's output; targets that keep it themselves override this. Without one: the copy the driver
        left in the run folder when it ended."""
        if run.exists(DRIVER_LOG):
            write(run.read_text(DRIVER_LOG))

    def log_tail(self, run: RunFolder, lines: int = 10) -> list[str]:
        """The last ``lines`` lines of the driver's output, wherever this target keeps it ([] when there is none)."""
        chunks: list[str] = []
        try:
            self.logs(run, chunks.append)
        except (OSError, TargetError):  # the log is on a host or an API this machine cannot reach
            return []
        return [line for line in "".join(chunks).splitlines() if line.strip()][-lines:]


def note_waiting(run: RunFolder, target: str, reason: str) -> None:
    """Record why the run waits as a `WAITING_EVENT` when that is news (the last one said something else), so the
    run's events tell a team what holds its job. Status is a read: one who may not write the run folder still
    sees the reason in the target's view."""
    last = next((e for e in reversed(events(run)) if e.get("event") == WAITING_EVENT), None)
    if last is not None and last.get("reason") == reason:
        return
    try:
        run.event(WAITING_EVENT, target=target, reason=reason)
        run.flush()
    except (OSError, StorageError):
        pass


def unrecorded_end(run: RunFolder, info: RunInfo, seen: Observation) -> dict:
    """The state of a run whose driver is gone without a word: why, as far as can be told from here, what survived
    and how to continue. A run folder whose disk is full explains the silence (the driver could write nothing)."""
    if seen.ended_as != RunState.FAILED:
        return {"state": seen.ended_as, "error": seen.error}
    if run.is_local and (free := space.free_bytes(run.local_path())) < space.WRITE_RESERVE_BYTES:
        what = (f"the driver ended without recording an outcome, and {space.filesystem_of(run.local_path())} "
                f"holding {run.uri()} has {space.size_text(free)} free")
        return {"state": RunState.FAILED, "error": disk_full_message(run, what), "error_kind": "disk_full"}
    last = last_complete_checkpoint(run)
    kept = f"last complete checkpoint {run.uri(last)}" if last else "no complete checkpoint"
    return {"state": RunState.FAILED, "error_kind": "driver_gone",
            "error": f"{seen.error}; {kept}; continue with: {resume_command(run, info)}"}


def tail_file(path: Path, write: Callable[[str], None], follow: bool, done: Callable[[], bool],
              poll_s: float = 1.0) -> None:
    """Write what ``path`` holds, and with ``follow`` what is appended to it until ``done()``."""
    offset = 0
    while True:
        with path.open(encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            chunk = handle.read()
            offset = handle.tell()
        if chunk:
            write(chunk)
        if not follow or done():
            return
        time.sleep(poll_s)


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Target:
    if name not in REGISTRY:
        raise TargetError(f"target '{name}' is not available; available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def addresses() -> dict[str, str]:
    """Target name → the setting `tunerun submit --address` fills in, for the targets that take one."""
    return {name: target.address_setting for name in REGISTRY if (target := get(name)).address_setting}


def renderable() -> tuple[str, ...]:
    """Targets with something to show before submitting (every target that overrides `Target.render`)."""
    return tuple(name for name in REGISTRY if type(get(name)).render is not Target.render)


@functools.cache
def settings_model() -> type[Strict]:
    """The spec's ``targets:`` block: one field per target that declares `Target.Settings`, in registry order."""
    declared = [(name, type(get(name)).Settings) for name in REGISTRY]
    fields = {name: (settings, settings()) for name, settings in declared if settings is not None}
    return create_model("TargetsSpec", __base__=Strict, **fields)


@functools.cache
def job_model() -> type[JobSpec]:
    """`JobSpec` that checks each target's settings: what the CLI and the service load jobs with."""
    targets = settings_model()
    return create_model("JobSpec", __base__=JobSpec, targets=(targets, targets()))


def for_run(run: RunFolder) -> Target:
    """The target that ran ``run``, by the ``target`` its run.json records."""
    name = read_info(run).target
    if name not in REGISTRY:
        raise TargetError(f"run {run.run_id} was started by target '{name}', which this tunerun does not know; "
                          f"known: {', '.join(REGISTRY)}")
    return get(name)


def _end_cancelled_mlflow_run(run: RunFolder) -> str | None:
    """A cancelled run's MLflow run ends KILLED: the target may have killed the driver before it closed it. The
    problem when that failed; None when it worked, the run is not tracked, or it had succeeded before the cancel
    reached it."""
    info = read_info(run)
    if not info.mlflow_run_id or info.state != RunState.CANCELLED:
        return None
    settings = read_job(run).spec.tracking.mlflow
    return end_mlflow_run(settings, info.mlflow_run_id, "KILLED") if settings else None
