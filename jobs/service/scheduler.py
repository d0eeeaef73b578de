"""The local target's queue: jobs beyond ``max_concurrent_runs`` wait as ``queued`` until a slot frees."""
from __future__ import annotations

import os
import socket
import subprocess
import threading

import yaml

from tunerun.cluster.runs import RunState, read_info
from tunerun.cluster.storage import RunFolder
from tunerun.jobs.errors import TunerunError
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.service.fine_tuning import JOB_ID, JobService


class Scheduler:
    """Local target: starts queued jobs, oldest first, while fewer than ``max_concurrent_runs`` run.

    The drivers run detached (their own session, as `tunerun submit --target local` starts them): a server that
    stops leaves them training, and the next one counts them as running from their run folders.
    """

    def __init__(self, jobs: JobService, poll_s: float = 1.0):
        self.jobs, self.poll_s = jobs, poll_s
        self._started: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunerun-scheduler", daemon=True)

    def start(self) -> None:
        if self.jobs.config.target == "local":
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except TunerunError:
                continue  # storage briefly unreachable: try again on the next tick

    def tick(self) -> None:
        from tunerun.cluster import local

        self._started = [p for p in self._started if p.poll() is None]  # reap finished drivers
        runs = [RunFolder(self.jobs.config.storage, run_id) for run_id in self.jobs.store.run_ids()
                if JOB_ID.fullmatch(run_id)]
        states = {run.run_id: local.LocalTarget().status(run).state for run in runs}
        active = sum(1 for state in states.values() if state in (RunState.PENDING, RunState.RUNNING))
        queued = sorted((run for run in runs if states[run.run_id] == RunState.QUEUED),
                        key=lambda run: read_info(run).updated_at or 0)
        for run in queued[:max(0, self.jobs.config.max_concurrent_runs - active)]:
            # Two servers on one storage see the same queue: the one whose claim on this launch lands starts it.
            if not run.claim(f"control/launch-{read_info(run).updated_at!r}", {"host": socket.gethostname(),
                                                                              "pid": os.getpid()}):
                continue
            job = ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml")))
            _, process = local.start(job)
            self._started.append(process)
