"""The local target's queue: jobs beyond ``max_concurrent_runs`` wait as ``queued`` until a slot frees.

Slots are shared fairly between projects: the next job is the oldest of the project with the fewest jobs running
(of those below their own ``projects.<name>.max_concurrent_runs``), taking turns among equals, so one team's
backlog never holds back another team whose own limit allows it a job (`fair_order`).

The queue is the run folders, not this process: a restarted server, or a second one on the same storage, sees the
same queue. So every launch is decided by a claim in the run folder (an exclusive create), and everything the
scheduler leaves behind when it dies must be readable as "nobody is starting this" by the next one:

- Claims go by generation: ``control/launch-<updated_at>``, then ``…-1``, ``…-2``. A claim older than
  `STALE_LAUNCH_S` on a run still queued was abandoned by its server, and the next generation is claimed; exactly
  one server wins each, and nothing is ever deleted. A claim left empty (a full disk cut the write) is aged by its
  file and holds no slot meanwhile: nobody is starting that job.
- A run left ``pending`` with no driver handle for that long is a launch that stopped before its driver was
  recorded: it is queued again (`record_requeued`), under a claim of its own.
- It reads only what can change: the index (`tunerun.jobs.service.index`) lists the jobs, and a tick reads the
  run.json of the jobs not known to have finished; every `RECHECK_S` it reads them all again, in case another
  tunerun took a finished run back.
- One job's failure is that job's: a transient one (OSError, StorageError: a full disk, storage unreachable) is
  tried again on later ticks and logged once per distinct error; any other (a job.yaml another tunerun wrote, a
  launch that raised) records the job ``failed`` with the reason. The jobs behind it still start, and the thread
  survives every `Exception`; `Scheduler.health` says whether it still ticks.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable

from tunerun.cluster import targets
from tunerun.cluster.run_folder import CONTROL, RunFolder, control, read_job
from tunerun.cluster.runs import RunInfo, RunState, record_refused, record_requeued
from tunerun.jobs.errors import StorageError, UnreadableJob
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.service.fine_tuning import JobService
from tunerun.jobs.service.index import RECHECK_S

logger = logging.getLogger("tunerun.serve")
# A launch (claim → run.json pending → driver started → its pid recorded) takes well under a second, and a driver
# records `running` within seconds: a claim or a handle-less pending run this old was abandoned by its server.
STALE_LAUNCH_S = 120.0
# Errors this server's own launch may meet again on the next tick; anything else fails the job.
TRANSIENT = (OSError, StorageError)


class Scheduler:
    """Local target: starts queued jobs, fairly across projects (`fair_order`), while fewer than
    ``max_concurrent_runs`` run, and fewer than its own limit of each project.

    The drivers run detached (their own session, as `tunerun submit --target local` starts them): a server that
    stops leaves them training, and the next one counts them as running from their run folders.
    """

    def __init__(self, jobs: JobService, poll_s: float = 1.0):
        self.jobs, self.poll_s = jobs, poll_s
        self.stalled_after_s = max(60.0, 20 * poll_s)  # a tick reads every run.json: slow storage is no hang
        self._started: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunerun-scheduler", daemon=True)
        # Who holds a claim: a restarted server may get the same host and pid (a container), never the same token.
        self._claimant = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}
        self._logged: dict[str, str] = {}  # what was last logged per job (or "tick"): each error once
        self._tick_errors: list[str] = []
        self._last_error: str | None = None
        self._last_tick: float | None = None
        self._read_all_at = -math.inf
        # Which project this server started a job for most recently (`fair_order`): kept in memory, so a restarted
        # server begins its round-robin afresh; the running counts it reads from the run folders come first anyway.
        self._served: dict[str, int] = {}

    def start(self) -> None:
        if self.jobs.config.target == "local":
            self._last_tick = time.monotonic()  # the first tick is due now: age counts from here
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> dict:
        """``scheduler``: running | stalled (no tick ended for `stalled_after_s`) | stopped (the thread ended, or
        never started) | off (not the local target: the cluster queues); ``last_tick_age_s``: seconds since a tick
        last ended (None before one did); ``last_error``: the last error the latest tick met, None if it met none."""
        if self.jobs.config.target != "local":
            return {"scheduler": "off", "last_tick_age_s": None, "last_error": None}
        age = None if self._last_tick is None else round(time.monotonic() - self._last_tick, 1)
        if not self._thread.is_alive():
            state = "stopped"
        else:
            state = "stalled" if age is not None and age > self.stalled_after_s else "running"
        return {"scheduler": state, "last_tick_age_s": age, "last_error": self._last_error}

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.tick()

    def tick(self) -> None:
        """One pass over the queue; never raises (what went wrong is logged and kept for `health`)."""
        self._tick_errors = []
        try:
            self._start_queued()
        except Exception as exc:  # noqa: BLE001 - storage unreachable, or a bug: the next tick tries again
            self._note("tick", f"a pass over the queue failed, trying again: {type(exc).__name__}: {exc}", exc,
                       level=logging.WARNING if isinstance(exc, TRANSIENT) else logging.ERROR)
        else:
            self._logged.pop("tick", None)
        finally:
            self._last_tick = time.monotonic()
            self._last_error = self._tick_errors[-1] if self._tick_errors else None

    def _start_queued(self) -> None:
        self._started = [p for p in self._started if p.poll() is None]  # reap finished drivers
        seen, abandoned = [], []
        for project, run, info in self._service_runs():
            (abandoned if _abandoned(info) else seen).append((project, run, info))
        for _, run, info in abandoned:  # queued again now, started on a later tick
            self._attempt(run, self._requeue, info)
        config = self.jobs.config
        running = Counter(project for project, _, info in seen if info.state in (RunState.PENDING, RunState.RUNNING))
        queued = [(project, info.updated_at or 0, (run, info)) for project, run, info in seen
                  if info.state == RunState.QUEUED]
        fair_order(queued, running, config.max_concurrent_runs, config.max_concurrent_runs_of,
                   lambda job: self._attempt(job[0], self._launch, job[1]), self._served)

    def _service_runs(self) -> list[tuple[str, RunFolder, RunInfo]]:
        """The service's runs that have not finished, as the local target sees them (all of them every
        `RECHECK_S`); one whose run.json cannot be read is left out."""
        from tunerun.cluster.local import LocalTarget

        index, target, seen = self.jobs.index, LocalTarget(), []
        read_all = time.monotonic() - self._read_all_at >= RECHECK_S
        for run, record in index.every_job() if read_all else index.unfinished():
            try:
                info = target.status(run, ask_finished=False)
            except Exception as exc:  # noqa: BLE001 - one unreadable run must not hide the others
                self._note(run.run_id, f"job {run.run_id}: its state cannot be read, skipped: {exc}")
                continue
            index.note(run.run_id, info)
            seen.append((record.project, run, info))
        if read_all:
            self._read_all_at = time.monotonic()
        return seen

    def _attempt(self, run: RunFolder, action, info: RunInfo) -> bool:
        """``action(run, info)`` (True: it went ahead), with its failure turned into a log line and, unless
        transient, a failed job."""
        try:
            done = action(run, info)
        except TRANSIENT as exc:
            self._note(run.run_id, f"job {run.run_id}: not started yet, trying again: {type(exc).__name__}: {exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - a bug or a refusal in one launch fails that job only
            self._fail(run, f"the server could not start the job: {type(exc).__name__}: {exc}", exc)
            return False
        if done:
            self._logged.pop(run.run_id, None)  # past its error: a later one is news again
        return done

    def _launch(self, run: RunFolder, info: RunInfo) -> bool:
        """Start a queued run if this server wins its launch; True when it takes a slot (started here, or being
        started by the server holding the claim)."""
        from tunerun.cluster import local

        held = self._claim(run, f"launch-{info.updated_at!r}")
        if held == "abandoned":
            self._note(run.run_id, f"job {run.run_id}: its launch claim was cut off (empty); it is claimed again "
                                   f"once {STALE_LAUNCH_S:.0f} s old")
        if held != "won":
            return held == "held"
        job = self._resolved_job(run)
        if job is None:
            return False
        _, process = local.start(job)
        self._started.append(process)
        logger.info("job %s: started, driver pid %s", run.run_id, process.pid)
        return True

    def _requeue(self, run: RunFolder, info: RunInfo) -> bool:
        if self._claim(run, f"requeue-{info.updated_at!r}") != "won":
            return False
        record_requeued(run, "the launch stopped before its driver was recorded")
        logger.warning("job %s: its launch stopped before the driver was recorded; queued again", run.run_id)
        return True

    def _resolved_job(self, run: RunFolder) -> ResolvedJob | None:
        """The run's job.yaml, or None after recording the job failed because this tunerun cannot read it."""
        try:
            return read_job(run, to_run=True)  # storage errors are transient: they propagate
        except UnreadableJob as exc:
            self._fail(run, f"{exc}; create the job again, or serve this storage with the tunerun that queued it")
            return None

    def _claim(self, run: RunFolder, base: str) -> str:
        """Claim the newest live generation of ``control/<base>``: "won" (this server acts), "held" (another
        server's claim is live: it acts) or "abandoned" (an empty claim not yet stale: no one acts, for now)."""
        generations = [_generation(name, base) for name in run.list_dir(CONTROL)]
        newest = max((g for g in generations if g is not None), default=None)
        if newest is not None:
            holder, age = _claim_record(run, control(_claim_name(base, newest)))
            if holder.get("token") == self._claimant["token"]:
                if age < STALE_LAUNCH_S / 2:
                    return "won"  # a transient error stopped our launch: try again under the same claim
                # else: claim the next generation well before other servers would call this one stale
            elif age < STALE_LAUNCH_S:
                return "held" if holder else "abandoned"
        generation = 0 if newest is None else newest + 1
        won = run.claim(control(_claim_name(base, generation)), {**self._claimant, "time": time.time()})
        return "won" if won else "held"

    def _fail(self, run: RunFolder, error: str, exc: BaseException | None = None) -> None:
        self._note(run.run_id, f"job {run.run_id}: failed: {error}", exc, level=logging.ERROR)
        try:
            record_refused(run, error, error_kind="internal")
        except Exception as unrecorded:  # noqa: BLE001 - still queued: the next tick meets the error again
            self._note(f"{run.run_id} record", f"job {run.run_id}: the failure could not be recorded: "
                                                f"{type(unrecorded).__name__}: {unrecorded}")

    def _note(self, key: str, message: str, exc: BaseException | None = None, level: int = logging.WARNING) -> None:
        """Log ``message`` unless it is what was last logged for ``key`` (a full disk would say it every tick)."""
        self._tick_errors.append(message)
        if self._logged.get(key) != message:
            self._logged[key] = message
            logger.log(level, "scheduler: %s", message, exc_info=exc if level >= logging.ERROR else None)


def fair_order(queued: list[tuple[str, float, object]], running: Counter, slots: int, cap: Callable[[str], int],
               start: Callable[[object], bool], served: dict[str, int] | None = None) -> list:
    """Start jobs from ``queued`` ((project, queued since, job) each) fairly; the jobs that took a slot, in order.

    ``running`` counts each project's running jobs, ``slots`` is the server's limit, ``served`` numbers each
    project's latest start (higher: more recent; updated here). Each pick goes to the project with the fewest
    running among those below ``cap(project)``, then to the one served longest ago (never first), then to the one
    whose next job has waited longest, and takes that project's oldest job: round-robin across projects, so a
    project that queued 30 jobs first does not start them all before another's one. ``start(job)`` says whether
    it took a slot (False: it failed, or another server is starting it under its claim). Picking stops when the
    server's slots are taken or no project may start another."""
    waiting: dict[str, deque] = defaultdict(deque)
    for project, since, job in sorted(queued, key=lambda item: item[1]):
        waiting[project].append((since, job))
    running, started, served = Counter(running), [], {} if served is None else served
    while sum(running.values()) < slots:
        allowed = [p for p, jobs in waiting.items() if jobs and running[p] < cap(p)]
        if not allowed:
            break
        project = min(allowed, key=lambda p: (running[p], served.get(p, -1), waiting[p][0][0]))
        job = waiting[project].popleft()[1]
        if start(job):
            running[project] += 1
            served[project] = max(served.values(), default=0) + 1
            started.append(job)
    return started


def _abandoned(info: RunInfo) -> bool:
    """A local run pending with no driver recorded for `STALE_LAUNCH_S`: the launch that left the queue never
    finished (a run another target holds is pending in that target's queue, with that target's handle)."""
    return (info.target == "local" and info.state == RunState.PENDING and targets.get("local").handle(info) is None
            and time.time() - (info.updated_at or 0) > STALE_LAUNCH_S)


def _claim_name(base: str, generation: int) -> str:
    return base if generation == 0 else f"{base}-{generation}"


def _generation(name: str, base: str) -> int | None:
    if name == base:
        return 0
    suffix = name.removeprefix(f"{base}-")
    return int(suffix) if suffix != name and suffix.isdigit() else None


def _claim_record(run: RunFolder, name: str) -> tuple[dict, float]:
    """What a claim holds ({} when it holds nothing readable) and its age in seconds: by the time it records, else
    by the file's mtime (a claim cut off by a full disk); a claim with neither is as old as can be."""
    try:
        holder = run.read_json(name)
    except (ValueError, StorageError):
        holder = None
    if isinstance(holder, dict) and isinstance(holder.get("time"), (int, float)):
        return holder, time.time() - holder["time"]
    holder = holder if isinstance(holder, dict) else {}
    if run.is_local:
        try:
            return holder, time.time() - run.local_path(name).stat().st_mtime
        except OSError:
            pass
    return holder, math.inf
