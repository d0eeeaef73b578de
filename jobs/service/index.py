"""The service's jobs in memory: which run folders are jobs, whose, in what order, and which have finished.

The run folders stay the ledger, and a restarted server or a second one on the same storage sees every job: this
index is only what this server has read of them, kept current from the storage. It lists the storage's top level
(one request) at most every `REFRESH_S` seconds, and looks a job id it does not know up at once, so a job another
server created a moment ago is found by id and listed within a second. What it keeps never changes once written:

- ``service.json`` is written once, before the run exists, and never again: read once per job;
- a run that ended succeeded, failed or cancelled stays so (the service resumes only paused runs), so its job
  object, made from run.json, the metrics and the record, is kept as long as run.json reads the same.

So a page of N jobs reads N run.json files whatever the project holds, the scheduler reads only runs that have
not finished, and a result file is found without reading any run folder. A finished run that some other tunerun
takes back (`tunerun resume` of a failed run) shows on its job page at once (run.json is read for every job
shown); the scheduler and the model list see it at their next full pass (`RECHECK_S`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tunerun.cluster.run_folder import RUN_INFO, SERVICE_RECORD, RunFolder
from tunerun.cluster.runs import RunInfo
from tunerun.cluster.targets import FINISHED
from tunerun.jobs.errors import StorageError
from tunerun.jobs.spec import StorageSpec

logger = logging.getLogger("tunerun.serve")
REFRESH_S = 1.0  # how stale the list of jobs may be on a server that did not create them
RECHECK_S = 60.0  # how often the scheduler reads every run.json again, finished or not
LEARN_THREADS = 16  # new jobs' records read side by side: 3 requests each, on S3 each a round trip


class JobIndex:
    """Job id → (its run folder, its service record), by project newest first, with what is known finished.

    ``list_ids`` names the top-level folders that may be jobs (one listing request), ``make_record`` turns a
    service.json into the service's record: `tunerun.jobs.service.fine_tuning` owns both.
    """

    def __init__(self, storage: StorageSpec, list_ids: Callable[[], list[str]], make_record: Callable[[dict], object],
                 refresh_s: float = REFRESH_S):
        self.storage, self.list_ids, self.make_record, self.refresh_s = storage, list_ids, make_record, refresh_s
        self._jobs: dict[str, tuple[RunFolder, object]] = {}
        self._by_project: dict[str, list[str]] = {}  # newest first; rebuilt when a job comes or goes
        self._by_result: dict[str, str] = {}  # result file id → job id
        self._finished: dict[str, RunInfo] = {}  # job id → run.json as last read, while it says finished
        self._memo: dict[str, dict[str, object]] = {}  # job id → what → made from a finished run's files
        self._listed_at = -math.inf
        self._lock = threading.Lock()  # the dicts above
        self._listing = threading.Lock()  # one listing at a time: requests arriving meanwhile share its result

    # ── which jobs there are ────────────────────────────────────────────────────────────────────────────────

    def refresh(self, force: bool = False) -> None:
        """List the storage (one request) unless this server did so within `refresh_s`; learn the new jobs, forget
        the folders that are gone."""
        if not force and time.monotonic() - self._listed_at < self.refresh_s:
            return
        with self._listing:
            if not force and time.monotonic() - self._listed_at < self.refresh_s:
                return  # another request listed while this one waited
            started = time.monotonic()
            with self._lock:
                known = set(self._jobs)  # a job created here while the listing runs is not "gone"
            names = set(self.list_ids())
            new, gone = names - known, known - names
            if new:  # a folder not (yet) a job is asked again on the next listing
                with ThreadPoolExecutor(min(LEARN_THREADS, len(new)), thread_name_prefix="tunerun-index") as pool:
                    list(pool.map(self._learn, sorted(new)))  # a restarted server on S3 meets thousands at once
            if gone:
                with self._lock:
                    for job_id in gone & self._jobs.keys():
                        self._forget(job_id)
            self._listed_at = started

    def _learn(self, job_id: str) -> tuple[RunFolder, object] | None:
        """The job ``job_id`` from its run folder, added to the index; None while it is not a job (yet): its record
        comes first, then run.json (`JobService.create`)."""
        run = RunFolder(self.storage, job_id)
        try:
            data = run.read_json_if_there(SERVICE_RECORD)
            if data is None or not run.exists(RUN_INFO):
                return None
            record = self.make_record(data)
        except (StorageError, ValueError, TypeError) as exc:  # unreadable now: asked again on the next listing
            logger.warning("job %s: its record cannot be read, left out for now: %s", job_id, exc)
            return None
        return self.add(run, record)

    def add(self, run: RunFolder, record) -> tuple[RunFolder, object]:
        """A job this server just created (or just read): listed from now on."""
        with self._lock:
            known = self._jobs.setdefault(run.run_id, (run, record))
            if known[1] is record:
                self._by_result[record.result_file] = run.run_id
                self._by_project.pop(record.project, None)
            return known

    def _forget(self, job_id: str) -> None:
        run, record = self._jobs.pop(job_id)
        self._by_result.pop(record.result_file, None)
        self._by_project.pop(record.project, None)
        self._finished.pop(job_id, None)
        self._memo.pop(job_id, None)

    def find(self, job_id: str) -> tuple[RunFolder, object] | None:
        """The job ``job_id`` (any project's, a well-formed id): from memory, else from its run folder (created a
        moment ago, perhaps by another server)."""
        with self._lock:
            found = self._jobs.get(job_id)
        return found if found is not None else self._learn(job_id)

    def jobs_of(self, project: str) -> list[tuple[RunFolder, object]]:
        """The project's jobs, newest first."""
        self.refresh()
        with self._lock:
            ids = self._by_project.get(project)
            if ids is None:
                owned = [(record.created_at, job_id) for job_id, (_, record) in self._jobs.items()
                         if record.project == project]
                ids = self._by_project[project] = [job_id for _, job_id in sorted(owned, reverse=True)]
            return [self._jobs[job_id] for job_id in ids]

    def by_result_file(self, project: str, file_id: str) -> tuple[RunFolder, object] | None:
        """The project's job whose result file is ``file_id``."""
        self.refresh()
        with self._lock:
            found = self._jobs.get(self._by_result.get(file_id, ""))
        return found if found is not None and found[1].project == project else None

    def every_job(self) -> list[tuple[RunFolder, object]]:
        self.refresh()
        with self._lock:
            return list(self._jobs.values())

    # ── what has finished ───────────────────────────────────────────────────────────────────────────────────

    def note(self, job_id: str, info: RunInfo) -> None:
        """The run's state as just read (run.json reconciled with its target): whether it has finished, and if its
        run.json changed, what was made from the old one is dropped."""
        with self._lock:
            if job_id not in self._jobs:
                return
            if self._finished.get(job_id) != info:
                self._memo.pop(job_id, None)
            if info.state in FINISHED:
                self._finished[job_id] = info
            else:
                self._finished.pop(job_id, None)

    def finished(self, job_id: str) -> RunInfo | None:
        """run.json of a run known to have finished (succeeded, failed or cancelled), as last read; None when it
        has not, or this server has not read it yet."""
        with self._lock:
            return self._finished.get(job_id)

    def unfinished(self) -> list[tuple[RunFolder, object]]:
        """Every job not known to have finished: queued, pending, running, paused, or not read yet."""
        self.refresh()
        with self._lock:
            return [found for job_id, found in self._jobs.items() if job_id not in self._finished]

    def made_once(self, job_id: str, what: str, info: RunInfo, make: Callable[[], object]):
        """``make()``, kept while ``info`` is the finished run's run.json as last noted; made afresh otherwise."""
        with self._lock:
            keep = info.state in FINISHED and self._finished.get(job_id) == info
            if keep and what in self._memo.get(job_id, {}):
                return self._memo[job_id][what]
        made = make()
        if keep:
            with self._lock:
                if self._finished.get(job_id) == info:
                    self._memo.setdefault(job_id, {})[what] = made
        return made
