"""What each project used: its jobs by status, the tokens they trained and worker-hours (GPU-hours on GPUs).

Read from the run folders, the ledger, like everything the service shows; nothing is counted anywhere else, so
a restarted server, a second one and `tunerun serve usage` on the admin's machine give the same figures.

- **Trained tokens**: the last ``tokens_seen`` of the job's metrics (the real, non-padding tokens of every step,
  counted on from a checkpoint when it resumes): what its job object reports as ``trained_tokens``.
- **Worker-hours**: each launch of the job, from the driver's ``run_started`` event to its outcome event
  (``run_succeeded``, ``run_failed``, ``run_cancelled``, ``run_preempted`` — a pause), times the workers of the
  run (run.json's ``workers``): the time its workers were held, data preparation included. A running launch
  counts until now; one whose driver died without a word, until its last event (or the target's end).
- **GPU-hours**: worker-hours × ``resources.gpus_per_worker`` of the job's spec; 0 for CPU jobs.

For a window (``since``), a job counts when it was created in it or trained in it; its worker-hours are the part
of its launches inside the window, its tokens those its metrics added inside it. A finished job's figures never
change: they are read once per server (the job index keeps them while its run.json reads the same).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tunerun.cluster.run_folder import RunFolder, events, metric_rows, read_job
from tunerun.cluster.runs import RunInfo, RunState
from tunerun.jobs.errors import StorageError, UnreadableJob
from tunerun.jobs.service.objects import STATUS

# The driver's outcome event is ``run_<state>`` (`tunerun.cluster.runs.record_outcome`, `record_cancelled`,
# `record_refused`): each one ends a launch.
OUTCOME_EVENTS = {f"run_{state}" for state in RunState if state.terminal}
LAUNCH_EVENT = "run_started"  # the driver's first event (`tunerun.trainer.entrypoint.run_job`)
TOKEN_POINT_S = 60  # tokens are kept per minute of a run: a window's edge is exact to the minute
HOUR = 3600.0


@dataclass(frozen=True)
class JobUsage:
    """One job's launches and tokens over time, from its run folder."""

    project: str
    status: str  # OpenAI's job status
    created_at: float
    workers: int
    gpus_per_worker: int
    launches: tuple[tuple[float, float | None], ...]  # (start, end); end None while the launch runs
    tokens: tuple[tuple[float, int], ...]  # (time, tokens_seen so far), the last row of each minute

    def active_in(self, since: float | None) -> bool:
        return since is None or self.created_at >= since or any(end is None or end >= since
                                                                for _, end in self.launches)

    def worker_hours(self, since: float | None, now: float) -> float:
        start_of = -math.inf if since is None else since
        held = sum(max(0.0, min(now, end if end is not None else now) - max(start, start_of))
                   for start, end in self.launches)
        return held * self.workers / HOUR

    def trained_tokens(self, since: float | None) -> int:
        if not self.tokens:
            return 0
        before = [count for at, count in self.tokens if since is not None and at < since]
        return max(0, self.tokens[-1][1] - (before[-1] if before else 0))


@dataclass
class ProjectUsage:
    project: str
    jobs: dict[str, int] = field(default_factory=dict)  # status → how many
    trained_tokens: int = 0
    worker_hours: float = 0.0
    gpu_hours: float = 0.0

    def add(self, job: JobUsage, since: float | None, now: float) -> None:
        self.jobs[job.status] = self.jobs.get(job.status, 0) + 1
        self.trained_tokens += job.trained_tokens(since)
        hours = job.worker_hours(since, now)
        self.worker_hours += hours
        self.gpu_hours += hours * job.gpus_per_worker

    def to_json(self) -> dict:
        return {"project": self.project, "jobs": dict(sorted(self.jobs.items())),
                "jobs_total": sum(self.jobs.values()), "trained_tokens": self.trained_tokens,
                "worker_hours": round(self.worker_hours, 4), "gpu_hours": round(self.gpu_hours, 4)}


def job_usage(run: RunFolder, project: str, created_at: float, info: RunInfo) -> JobUsage:
    """What ``run`` used, with ``info`` its run.json as its target reports it now."""
    return JobUsage(project=project, status=STATUS[info.state], created_at=created_at,
                    workers=info.workers or 1, gpus_per_worker=_gpus_per_worker(run),
                    launches=tuple(_launches(events(run), info)), tokens=tuple(_token_points(run)))


def _launches(found: list[dict], info: RunInfo) -> list[tuple[float, float | None]]:
    launches, start, last = [], None, None
    for event in found:
        at = event.get("time")
        if not isinstance(at, (int, float)):
            continue
        if event.get("event") == LAUNCH_EVENT:
            if start is not None:  # the earlier driver died without recording an outcome: until its last word
                launches.append((start, last))
            start = at
        elif event.get("event") in OUTCOME_EVENTS and start is not None:
            launches.append((start, at))
            start = None
        last = at
    if start is not None:
        if info.state == RunState.RUNNING:
            launches.append((start, None))
        else:  # ended without its event (its target's word, a full disk): the recorded end, else its last event
            launches.append((start, info.finished_at if (info.finished_at or 0) >= start else last))
    return launches


def _token_points(run: RunFolder) -> list[tuple[float, int]]:
    points: list[tuple[float, int]] = []
    for row in metric_rows(run).train:
        if row.tokens_seen is None:
            continue
        if points and int(points[-1][0] // TOKEN_POINT_S) == int(row.time // TOKEN_POINT_S):
            points[-1] = (row.time, row.tokens_seen)
        else:
            points.append((row.time, row.tokens_seen))
    return points


def _gpus_per_worker(run: RunFolder) -> int:
    try:
        return read_job(run).spec.resources.gpus_per_worker
    except (StorageError, UnreadableJob):  # no job.yaml yet (a job being created), or one this tunerun cannot read
        return 0


def usage_by_project(jobs, project: str | None = None, since: float | None = None,
                     now: float | None = None) -> dict[str, ProjectUsage]:
    """Every project's usage (``project``'s only, when given) from ``since`` on, from the service's jobs
    (`tunerun.jobs.service.fine_tuning.JobService`)."""
    now = time.time() if now is None else now
    found: dict[str, ProjectUsage] = {}
    owned = jobs.jobs_of(project) if project is not None else jobs.index.every_job()
    for run, record in owned:
        used = _used(jobs, run, record)
        if used.active_in(since):
            found.setdefault(record.project, ProjectUsage(record.project)).add(used, since, now)
    if project is not None:
        found.setdefault(project, ProjectUsage(project))  # a project with no jobs used nothing: say so
    return dict(sorted(found.items()))


def _used(jobs, run: RunFolder, record) -> JobUsage:
    # A finished job's run.json as last read (it stays so: `tunerun.jobs.service.index`), so a project's thousand
    # old jobs cost no reads; any other as its target reports it now (a driver gone is no longer running).
    info = jobs.index.finished(run.run_id) or jobs.status(run)
    return jobs.index.made_once(run.run_id, "usage", info,
                                lambda: job_usage(run, record.project, record.created_at, info))
