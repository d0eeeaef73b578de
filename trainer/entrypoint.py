"""The one entrypoint every target ends in: ``python -m tunerun.trainer <run-folder>``.

It reads the resolved job from the run folder, prepares the data, starts Ray Train's `TorchTrainer` and records
the outcome in ``run.json``. A target only decides where this process starts; it never changes what it does.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunerun.cluster import space
from tunerun.cluster.run_folder import (DATA, DATA_REPORT, DISK_FULL, DRIVER_LOG, PREPARED_FILES, STOPPED, RunFolder,
                                        read_job, saved_world_size)
from tunerun.cluster.runs import RunState, disk_full_message, record_outcome, reserve_outcome_space, update_info
from tunerun.jobs.errors import DiskFullError, TargetError, TunerunError
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.spec import StorageSpec
from tunerun.trainer import preemption
from tunerun.trainer.inputs import localize_data, localize_model

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_PREEMPTED = 3  # stopped at a checkpoint on request: launch the same run again to continue
EXIT_DISK_FULL = 4  # a disk filled and not even the reserved outcome file could record it
RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"  # Ray Train's record of reported checkpoints
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's own variable (ray.train.v2 constants)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # ditto
SMALL_WORKER_GROUP = 16
# ray._private.node's words when the raylet has not registered within its fixed 30 s: it first waits for its agents
# (Python processes), which on a machine at a load of 15+ can take that long. Another start usually makes it.
RAY_NODE_TIMEOUT = "timed out during startup"
EMBEDDED_RAY_ATTEMPTS = 3


def main(argv: list[str] | None = None) -> int:
    run = run_folder_from_argv(argv)
    tracking = None
    try:
        job = read_job(run, to_run=True)
        run = RunFolder(job.spec.storage, run.run_id)  # the spec's full settings: region, checksums
        tracking = _open_tracking(job, run)
        run_job(run, job)
    except DiskFullError as exc:  # the next checkpoint would not fit: the workers stopped before writing it
        return _disk_full(run, tracking, str(exc))
    except TunerunError as exc:
        _finish(run, tracking, RunState.FAILED, error=str(exc), error_kind="user")
        _say(f"error: {exc}")
        return EXIT_USER_ERROR
    except preemption.Preempted as exc:
        _finish(run, tracking, RunState.PREEMPTED, detail=str(exc))
        return EXIT_PREEMPTED
    except (KeyboardInterrupt, SystemExit):
        # `tunerun cancel` / Ctrl-C: SIGTERM reaches us as SystemExit once Ray has installed its handler.
        _finish(run, tracking, RunState.CANCELLED)
        return EXIT_INTERNAL_ERROR
    except Exception as exc:  # noqa: BLE001 - the run folder must say the run ended, whatever happened
        full = space.disk_full_in(exc)
        if full is not None:  # the disk filled anyway (another process took the space), wherever it surfaced
            return _disk_full(run, tracking, disk_full_message(run, space.describe_disk_full(full, run.uri())))
        _say(traceback.format_exc())
        _finish(run, tracking, RunState.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000], error_kind="internal")
        return EXIT_INTERNAL_ERROR
    _finish(run, tracking, RunState.SUCCEEDED)
    return 0


def run_folder_from_argv(argv: list[str] | None = None) -> RunFolder:
    """The run folder the command line names, reached with the storage settings the target passed along
    (`tunerun.cluster.targets.trainer_command`): the spec holds them too, but job.yaml must be read first, and an
    on-prem store with a private CA refuses that read without them."""
    parser = argparse.ArgumentParser(prog="python -m tunerun.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("run_uri", help="the run folder: a local path or s3://bucket/prefix/<run-id>")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                        help="S3-compatible endpoint (MinIO, Ceph RGW) holding the run folder")
    parser.add_argument("--ca-bundle", help="PEM file of the private CA that signed the endpoint's certificate")
    parser.add_argument("--no-verify-tls", dest="verify_tls", action="store_false",
                        help="do not verify the endpoint's TLS certificate (storage.verify_tls: false)")
    parser.add_argument("--addressing-style", choices=("auto", "path", "virtual"), default="auto",
                        help="S3 bucket addressing (storage.addressing_style)")
    args = parser.parse_args(argv)
    storage_uri, run_id = args.run_uri.rstrip("/").rsplit("/", 1)
    storage = StorageSpec(uri=storage_uri or "/", endpoint_url=args.endpoint_url, ca_bundle=args.ca_bundle,
                          verify_tls=args.verify_tls, addressing_style=args.addressing_style)
    return RunFolder(storage, run_id)


def _disk_full(run: RunFolder, tracking, message: str) -> int:
    """Record a disk-full outcome where it can be; exit 2 when recorded, `EXIT_DISK_FULL` when nowhere could
    hold it (the CLI that follows the run then says so from the exit code)."""
    _say(f"error: {message}")
    recorded = _finish(run, tracking, RunState.FAILED, error=message, error_kind="disk_full")
    if not recorded:
        _say(f"error: the outcome could not be recorded in {run.uri()} either")
    _detach_full_stdio()
    return EXIT_USER_ERROR if recorded else EXIT_DISK_FULL


def run_job(run: RunFolder, job: ResolvedJob) -> None:
    # An earlier launch's stop request is done with; one made from here on (a pause while the data is prepared)
    # must reach the workers, so the slate is cleaned before the run says it is running.
    preemption.clear(run)
    if run.exists(DISK_FULL):  # an earlier launch's verdict; this one checks for itself
        run.delete(DISK_FULL)
    reserve_outcome_space(run)
    update_info(run, state=RunState.RUNNING, started_at=time.time(), versions=versions(), host=platform.node())
    run.event("run_started", pid=os.getpid())
    check_resume_world_size(run, job)
    check_offload_ram(job)
    env = worker_environment(run, job)
    # Ray starts (seconds of waiting on its processes) while the data is prepared and the trainer's modules load:
    # about 10 s less from `tunerun run` to the first step (README, cold start). Workers fetch the model on their own
    # node; the driver needs it only for the tokenizer. Ray starts in the main thread: only there does it install
    # the SIGTERM handler that turns `tunerun cancel` into SystemExit.
    preparing = InBackground(lambda: (prepare(run, localize_data(localize_model(job))), import_trainer()))
    if not ray_started():
        _start_ray(job, env)
    preparing.wait()
    fit(run, job, env)


class InBackground:
    """``work()`` in a daemon thread: the interpreter does not wait for it when a cancel ends the process."""

    def __init__(self, work):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="tunerun-prepare", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by `wait`
            self._error = exc

    def wait(self) -> None:
        """Until ``work`` is done; what it raised is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def _open_tracking(job: ResolvedJob, run: RunFolder):
    """The MLflow run of this tunerun run, when the job tracks to MLflow (`tunerun.trainer.tracking`)."""
    if job.spec.tracking.mlflow is None:
        return None
    from tunerun.trainer.tracking import open_driver_tracking

    return open_driver_tracking(job, run, warn=lambda message: _say(f"warning: {message}"))


def check_resume_world_size(run: RunFolder, job: ResolvedJob) -> None:
    """ZeRO shards (full, QLoRA + ZeRO-3) fit only the world size that wrote them; DDP LoRA/QLoRA state is
    replicated and fits any."""
    saved = saved_world_size(run)
    workers = job.spec.resources.num_workers
    if not saved or saved == workers:
        return  # the usual case decided without importing a method (and the training stack with it)
    from tunerun.trainer.methods import method_for

    if method_for(job.spec.method).SHARDED_STATE:
        raise TargetError(f"run {run.run_id}: its newest checkpoint holds ZeRO shards of {saved} workers, this "
                          f"launch has {workers}; resume with resources giving {saved} workers "
                          f"(nodes × workers_per_node)")


def check_offload_ram(job: ResolvedJob) -> None:
    """What ZeRO offloads must fit this node's RAM (resources.cpu_memory_gb, else what the node has): refused
    here, before a model loads, rather than met as an out-of-memory kill mid-run."""
    from tunerun.jobs.memory import GB, machine_ram, offload_ram_problem

    declared = job.spec.resources.cpu_memory_gb
    if problem := offload_ram_problem(job.spec, declared * GB if declared else machine_ram()):
        raise TargetError(f"method.zero: {problem}")


def prepare(run: RunFolder, job: ResolvedJob) -> None:
    """Tokenize once on the driver (or reuse the content-hash cache of an identical preparation); workers read
    the prepared examples from the run folder."""
    from tunerun.trainer.data.cache import prepare_to_folder, prepared_folder, read_report

    if run.exists(DATA_REPORT):
        return  # a resumed run trains on exactly the data it started with
    if run.is_local:
        report = prepare_to_folder(job, run.local_path(DATA), None)
    else:
        folder, _ = prepared_folder(job, None)
        for name in PREPARED_FILES:  # data_report.json last: its presence means the data folder is complete
            run.upload(folder / name, f"{DATA}/{name}")
        report = read_report(folder)
    run.event("data_prepared", **{k: report[k] for k in ("records_read", "train_records", "eval_records")})


def worker_environment(run: RunFolder, job: ResolvedJob) -> dict:
    """What the workers' environment needs beyond the driver's: DeepSpeed's CPU accelerator, the S3 SDK settings
    of an object-store run folder, and Ray Train's health-check interval (see `health_check_interval`)."""
    env = {"DS_ACCELERATOR": "cpu"} if job.spec.resources.gpus_per_worker == 0 else {}
    if not run.is_local:
        from tunerun.cluster.s3 import sdk_environment

        env.update(sdk_environment(run.storage))
    return env | {HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, health_check_interval(job))}


def health_check_interval(job: ResolvedJob) -> str:
    """Ray Train's controller polls its workers this often (Ray's default 2 s) and notices the end of training at a
    poll: 2 s cost each run ~3 s between its last checkpoint and fit returning. A small worker group is polled every
    0.5 s; a large one (a poll asks every worker) at Ray's default."""
    return "0.5" if job.spec.resources.num_workers <= SMALL_WORKER_GROUP else "2.0"


def import_trainer() -> None:
    """What `fit` imports: Ray Train's torch trainer (Ray Train and torch, seconds of work)."""
    importlib.import_module("ray.train.torch")


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs: `tunerun.trainer.loop`, imported there. Ray pickles this function by
    reference, so the driver needs only this module: importing the loop here would make the driver import
    transformers, PEFT and their stack (seconds of CPU while Ray starts beside it) only to name the function."""
    from tunerun.trainer.loop import train_loop_per_worker as loop

    loop(config)


def ray_started() -> bool:
    import ray

    return ray.is_initialized()


def fit(run: RunFolder, job: ResolvedJob, env: dict) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    trainer_class = _torch_trainer(embedded=_embedded_ray())
    resources = job.spec.resources
    storage_path, filesystem = _ray_storage(run)
    # Resume reads tunerun's manifests, and retention deletes checkpoints Ray never hears about: Ray's own list
    # of them would name deleted folders and make Ray refuse to start this run again.
    run.delete(RAY_CHECKPOINT_LIST)
    received = preemption.install_driver_handlers(run)
    run.flush()  # rank 0 appends to events.jsonl from here on
    trainer = trainer_class(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(job),
        ),
        run_config=RunConfig(
            name=run.run_id,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # tunerun's retention: checkpoint.apply_retention
            worker_runtime_env={"env_vars": env},
        ),
    )
    trainer.fit()
    if run.exists(DISK_FULL):
        raise DiskFullError(run.read_json(DISK_FULL)["message"])
    if run.exists(STOPPED):  # not when the signal came too late to stop before the last step
        step = run.read_json(STOPPED)["step"]
        raise preemption.Preempted(f"stopped at the checkpoint of step {step} on {', '.join(received) or 'request'}")


def _torch_trainer(embedded: bool):
    """Ray Train's TorchTrainer; on an embedded Ray, without the parts that serve a long-lived, autoscaled cluster and
    Ray Data, each an actor (a Ray worker process, ~1.5 s of CPU to start) that an embedded run pays for nothing:
    - the placement-group cleaner removes a run's placement group when its controller dies; an embedded Ray dies with
      the driver. It also asks the state API, which an embedded Ray without a dashboard lacks: a traceback in every
      driver log, and where an old `ray start` had left its address in /tmp/ray, a 12 s stall at every run's end;
    - the dataset manager shards Ray Datasets: tunerun's workers read their prepared shard from the run folder;
    - the autoscaling coordinator asks an autoscaler for the workers' resources: an embedded Ray has none."""
    from ray.train.torch import TorchTrainer

    if not embedded:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    except ImportError:  # another Ray Train layout: its defaults, as a cluster gets them
        return TorchTrainer

    class FixedWorkers(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass  # the base class registers the workers with the autoscaling coordinator here

        def _maybe_send_resource_request(self) -> None:
            pass

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            left_out = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["scaling_policy"] = FixedWorkers(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return EmbeddedTorchTrainer


def _embedded_ray() -> bool:
    """A Ray started by this driver (the local target); otherwise RAY_ADDRESS names the cluster (Slurm, KubeRay)."""
    return not os.environ.get("RAY_ADDRESS")


def _ray_storage(run: RunFolder):
    """Where Ray Train persists checkpoints: the run folder's parent, through pyarrow for object storage."""
    if run.is_local:
        return str(run.local_path().parent), None
    from tunerun.cluster.s3 import pyarrow_filesystem, split_uri

    bucket, prefix = split_uri(run.storage.uri)
    return f"{bucket}/{prefix}".rstrip("/"), pyarrow_filesystem(run.storage)


def _start_ray(job: ResolvedJob, env: dict) -> None:
    """Embedded Ray for the local target; an existing cluster when RAY_ADDRESS says so (Slurm, KubeRay). Ray Train's
    controller is an actor of this job: it reads the health-check interval from the job's environment."""
    import ray

    os.environ.update(env)
    if not _embedded_ray():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                 runtime_env={"env_vars": {HEALTH_CHECK_ENV: env[HEALTH_CHECK_ENV]}})
        return
    # Ray Train's preemption watcher (an actor polling for nodes about to be drained) has nothing to watch on the
    # one node an embedded Ray runs on: ~3 s of CPU per run to start it. The environment may still ask for it.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    needed = job.spec.resources.num_workers * job.spec.resources.cpus_per_worker
    for attempt in range(1, EMBEDDED_RAY_ATTEMPTS + 1):
        try:
            # Logical CPUs only gate scheduling: on a 2-core laptop two 1-CPU workers plus Ray's own actors must fit.
            # address="local": always a fresh embedded Ray, even when a `ray start` cluster runs on this machine.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed + 1), include_dashboard=False,
                     log_to_driver=True)
            return
        except Exception as exc:
            if RAY_NODE_TIMEOUT not in str(exc) or attempt == EMBEDDED_RAY_ATTEMPTS:
                raise
            _say(f"warning: Ray's node did not start within its 30 s (a busy machine: its agents start slowly); "
                 f"starting it again ({attempt + 1} of {EMBEDDED_RAY_ATTEMPTS})")
            _stop_processes(_ray_processes())  # this driver started no Ray before: all of them are the failed start's


def _ray_processes() -> set:
    """This driver's descendants that run Ray's own programs (GCS, raylet, monitors: a binary or script in Ray's
    package), not its data-preparation workers, whose command line only mentions Ray's folder in the sys.path it
    passes on (Ray puts its thirdparty_files there)."""
    import psutil
    import ray

    home = os.path.dirname(ray.__file__)
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if any(part.startswith(home) for part in child.cmdline()):
                found.add(child)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def _stop_processes(processes: set) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(processes), timeout=10)


def _worker_resources(job: ResolvedJob) -> dict:
    resources = {"CPU": job.spec.resources.cpus_per_worker}
    if job.spec.resources.gpus_per_worker:
        resources["GPU"] = job.spec.resources.gpus_per_worker
    return resources


def _finish(run: RunFolder, tracking, state: RunState, **fields) -> bool:
    """Record the outcome (run.json, else the reserved file on a full disk); False when neither could hold it.
    The MLflow run then ends with the same outcome (FINISHED / FAILED / KILLED)."""
    try:
        record_outcome(run, state, **fields)
    except OSError as exc:
        if not space.is_disk_full(exc):
            raise
        return False
    if tracking is not None:
        try:
            tracking.finish(state)
        except Exception as exc:  # noqa: BLE001 - the outcome is recorded; tracking is a mirror of it
            _say(f"warning: MLflow run not closed: {type(exc).__name__}: {exc}")
    log = os.environ.get("TUNERUN_DRIVER_LOG")
    if log and not run.is_local and Path(log).is_file():
        try:
            run.upload(Path(log), DRIVER_LOG)
        except OSError as exc:  # the local spool filled up: the outcome is recorded, the log copy is a convenience
            _say(f"warning: driver log not uploaded: {exc}")
    return True


def _say(text: str) -> None:
    """Print to the driver log, which may sit on the very disk that is full: then the words are lost, not the run."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _detach_full_stdio() -> None:
    """Output still buffered for a full disk would make the interpreter exit 120 instead of our code."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "ray", "deepspeed", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["tunerun_git_commit"] = _git_commit()
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
