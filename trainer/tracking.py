"""Experiment tracking: the run's numbers, also where the team looks — a self-hosted MLflow server, TensorBoard.

The run folder stays the record (metrics.jsonl, eval/, report.html); a tracker only mirrors it, so nothing here
may stop or slow training. `MlflowTracker` sends from a background thread: an unreachable server gets a warning
in the log and retries with backoff while the steps go on. `TensorBoardWriter` writes event files under
``<run folder>/tensorboard/``.

Who does what: the driver (`open_driver_tracking`) creates or, on resume, reopens the MLflow run — its id is kept
in run.json, so a relaunch continues the same run — logs the resolved job as params and the tags, and at the end
the gates' verdict, the artifacts and the status (FINISHED / FAILED / KILLED). World rank 0 (`open_worker_trackers`)
logs every metrics row at its step.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from tunerun.cluster.run_folder import DATA_REPORT, EVAL, REPORT, RunFolder, data_report, metric_rows
from tunerun.cluster.runs import RunState, read_info, update_info
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.spec import MlflowSpec

# MLflow's own limits (mlflow.utils.validation): a param value holds 6000 characters, a key 250; one log_batch
# call takes 100 params and 1000 metrics.
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
PARAMS_PER_BATCH = 100
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # then every 30 s while the server stays away
MAX_PENDING = 10_000  # updates kept while the server is away; older ones are dropped (metrics.jsonl has them)
CLOSE_WAIT_S = 20.0  # at the end of a run: how long pending updates may still try to reach the server
STATUS = {RunState.SUCCEEDED: "FINISHED", RunState.FAILED: "FAILED", RunState.CANCELLED: "KILLED"}
NOT_METRICS = {"time", "step", "total_steps"}
DATA_COUNTS = ("records_read", "train_records", "eval_records")


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """The resolved job as MLflow params: dotted keys, lists as JSON, values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - 1] + "…"
        flat[name[:MAX_PARAM_KEY]] = text
    return flat


def numeric_metrics(row: dict) -> dict[str, float]:
    """What of a metrics.jsonl row is a curve: numbers (not flags, not the step counter itself)."""
    return {k: float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def configure_mlflow_client() -> None:
    """MLflow's client retries a request 7 times with backoff before it answers (minutes): tunerun retries on its
    own thread instead, so each attempt must fail fast. A user's explicit setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _warn_to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class MlflowTracker:
    """One MLflow run, fed from a background thread that retries with backoff; never raises into training."""

    def __init__(self, settings: MlflowSpec, run_id: str, warn: Callable[[str], None] = _warn_to_stderr):
        configure_mlflow_client()
        from mlflow.tracking import MlflowClient

        self.settings, self.run_id, self.warn = settings, run_id, warn
        self.client = MlflowClient(settings.tracking_uri)
        self._pending: deque[tuple[str, Callable[[], None]]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self._submit(f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[start:start + PARAMS_PER_BATCH]
            self._submit("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        self._submit(f"artifact {local_path.name}",
                     lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path))

    def terminate(self, status: str) -> None:
        self._submit(f"status {status}", lambda: self.client.set_terminated(self.run_id, status))

    def close(self, wait_s: float = CLOSE_WAIT_S) -> bool:
        """Send what is pending within ``wait_s``; False (with a warning) when some of it never reached the server."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(wait_s)
        left = len(self._pending) + self._dropped
        if left:
            self.warn(f"MLflow ({self.settings.tracking_uri}): {left} update(s) not sent; the run folder "
                      "(metrics.jsonl, eval/, report.html) holds everything")
        return not left

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        with self._wake:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append((what, call))
            self._wake.notify_all()

    def _send_forever(self) -> None:
        failures = 0
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                what, call = self._pending[0]
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - a tracking server's trouble must never reach training
                if failures == 0:
                    self.warn(f"MLflow tracking server {self.settings.tracking_uri} did not take the {what} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); training goes on, retrying with backoff")
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                with self._wake:  # a close() wakes the wait; the retry still happens until close's deadline
                    self._wake.wait(delay)
                continue
            if failures:
                self.warn(f"MLflow tracking server {self.settings.tracking_uri} reachable again after {failures} "
                          f"failed attempt(s); sending the {len(self._pending)} pending update(s)")
                failures = 0
            with self._wake:
                self._pending.popleft()


class TensorBoardWriter:
    """Scalars as TensorBoard event files in ``<run folder>/tensorboard/`` (written locally, copied up on flush
    when the run folder is on object storage: TensorBoard reads either)."""

    def __init__(self, run: RunFolder, scratch: Path):
        from tensorboardX import SummaryWriter

        self.run = run
        self.folder = run.local_path("tensorboard") if run.is_local else scratch / "tensorboard"
        self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=30)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if not self.run.is_local:
            for path in self.folder.iterdir():
                self.run.upload(path, f"tensorboard/{path.name}")

    def close(self) -> None:
        self.writer.close()
        self.flush()


class WorkerTrackers:
    """What rank 0 feeds each metrics row to; empty (and free) when the job tracks nothing."""

    def __init__(self, mlflow: MlflowTracker | None, tensorboard: TensorBoardWriter | None):
        self.mlflow, self.tensorboard = mlflow, tensorboard

    def log_row(self, step: int, row: dict) -> None:
        values = numeric_metrics(row)
        for tracker in (self.mlflow, self.tensorboard):
            if tracker is not None:
                tracker.log_metrics(step, values)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close()


def open_worker_trackers(job: ResolvedJob, run: RunFolder, rank: int, scratch: Path,
                         warn: Callable[[str], None]) -> WorkerTrackers:
    tracking = job.spec.tracking
    if rank != 0 or not tracking.enabled:
        return WorkerTrackers(None, None)
    mlflow_id = read_info(run).mlflow_run_id if tracking.mlflow else None
    mlflow = MlflowTracker(tracking.mlflow, mlflow_id, warn) if mlflow_id else None
    return WorkerTrackers(mlflow, TensorBoardWriter(run, scratch) if tracking.tensorboard else None)


class DriverTracking:
    """The driver's side of the MLflow run: created or reopened at the start, closed with the run's outcome."""

    def __init__(self, tracker: MlflowTracker, run: RunFolder, settings: MlflowSpec):
        self.tracker, self.run, self.settings = tracker, run, settings

    def finish(self, state: RunState) -> None:
        """Data counts, gates and artifacts, then the status; a preempted run stays RUNNING (it resumes). The
        forgetting drop came with the final eval's metrics."""
        info = read_info(self.run)
        report = data_report(self.run)
        if report is not None:
            self.tracker.set_tags({f"tunerun.data.{key}": report[key] for key in DATA_COUNTS if key in report})
        if info.gates:
            self.tracker.set_tags({"tunerun.gates": "passed" if info.gates["passed"] else "failed"})
            self.tracker.log_metrics(self._last_step(), {"gates_passed": float(info.gates["passed"])})
        if self.settings.log_artifacts:
            for name, folder in self._artifacts():
                self.tracker.log_artifact(name, folder)
        if state in STATUS:
            self.tracker.terminate(STATUS[state])
        self.tracker.close()

    def _last_step(self) -> int:
        return max((row.step for row in metric_rows(self.run).ordered), default=0)

    def _artifacts(self) -> list[tuple[Path, str | None]]:
        names = [REPORT, DATA_REPORT, *(f"{EVAL}/{n}" for n in self.run.list_files(EVAL))]
        found = []
        scratch = Path(tempfile.mkdtemp(prefix="tunerun-mlflow-"))
        for name in names:
            if not name.endswith((".html", ".json")) or not self.run.exists(name):
                continue
            local = self.run.local_path(name) if self.run.is_local else self.run.download(name, scratch / name)
            folder = str(Path(name).parent) if "/" in name else None
            found.append((local, folder))
        return found


def open_driver_tracking(job: ResolvedJob, run: RunFolder,
                         warn: Callable[[str], None] = _warn_to_stderr) -> DriverTracking | None:
    """Create the MLflow run (or reopen the one run.json names: a resumed run continues its curve)."""
    settings = job.spec.tracking.mlflow
    if settings is None:
        return None
    configure_mlflow_client()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    known = read_info(run).mlflow_run_id
    try:
        mlflow_id = _reopen(client, known) if known else _create(client, job, settings)
    except Exception as exc:  # noqa: BLE001 - the run trains untracked rather than not at all
        warn(f"MLflow tracking server {settings.tracking_uri} unreachable at the start of the run "
             f"({type(exc).__name__}: {str(exc)[:200]}); this launch is not tracked there, the run folder "
             "records everything")
        return None
    if not known:
        update_info(run, mlflow_run_id=mlflow_id)
    tracker = MlflowTracker(settings, mlflow_id, warn)
    if not known:  # params are immutable in MLflow: logged once, by the launch that created the run
        tracker.log_params(flatten_params(job.model_dump(mode="json")))
        tracker.set_tags(_tags(job))
    run.event("mlflow_run", run_id=mlflow_id, tracking_uri=settings.tracking_uri, resumed=bool(known))
    return DriverTracking(tracker, run, settings)


def _create(client, job: ResolvedJob, settings: MlflowSpec) -> str:
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
    return client.create_run(experiment_id, run_name=settings.run_name or job.run_id).info.run_id


def _reopen(client, mlflow_id: str) -> str:
    client.update_run(mlflow_id, status="RUNNING")
    return mlflow_id


def _tags(job: ResolvedJob) -> dict[str, str]:
    from tunerun.trainer.entrypoint import versions

    commit = versions().get("tunerun_git_commit")
    tags = {**job.spec.tracking.mlflow.tags, "tunerun.run_id": job.run_id, "tunerun.run_uri": job.run_uri,
            "tunerun.method": job.spec.method.kind, "tunerun.model": job.spec.model.path,
            "tunerun.workers": str(job.spec.resources.num_workers)}
    if commit:
        tags["mlflow.source.git.commit"] = tags["tunerun.git_commit"] = commit
    return tags


def register_export(run: RunFolder, job: ResolvedJob, folder: Path, model_name: str):
    """Log an exported model folder to the run's MLflow run and register it as a new version of ``model_name``."""
    from tunerun.jobs.errors import ExportError

    configure_mlflow_client()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow_id = read_info(run).mlflow_run_id
    if not mlflow_id:
        raise ExportError(f"run {run.run_id} has no MLflow run (run.json has no mlflow_run_id): the tracking server "
                          "was unreachable when it started; register the exported folder yourself")
    client = MlflowClient(job.spec.tracking.mlflow.tracking_uri)
    artifact_path = f"model/{folder.name}"
    try:
        client.log_artifacts(mlflow_id, str(folder), artifact_path)
        try:
            client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(mlflow_id).info.artifact_uri}/{artifact_path}"
        return client.create_model_version(model_name, source, run_id=mlflow_id,
                                           tags={"tunerun.run_id": run.run_id})
    except MlflowException as exc:
        raise ExportError(f"MLflow ({job.spec.tracking.mlflow.tracking_uri}) refused the model: {exc.message}") \
            from None
