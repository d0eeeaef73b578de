"""The one entrypoint every target ends in: ``python -m tunerun.trainer <run-folder>``.

It reads the resolved job from the run folder, prepares the data, starts Ray Train's `TorchTrainer` and records
the outcome in ``run.json``. A target only decides where this process starts; it never changes what it does.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from tunerun.cluster.storage import RunFolder
from tunerun.jobs.errors import DataError, TunerunError
from tunerun.jobs.plan import ResolvedJob

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tunerun.trainer <run-folder>", file=sys.stderr)
        return EXIT_USER_ERROR
    folder = Path(argv[0])
    run = RunFolder(folder.parent, folder.name)
    try:
        run_job(run)
    except TunerunError as exc:
        _finish(run, "failed", error=str(exc), error_kind="user")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, SystemExit):
        # `tunerun cancel` / Ctrl-C: SIGTERM reaches us as SystemExit once Ray has installed its handler.
        _finish(run, "cancelled")
        return EXIT_INTERNAL_ERROR
    except Exception as exc:  # noqa: BLE001 - the run folder must say the run ended, whatever happened
        traceback.print_exc()
        _finish(run, "failed", error=f"{type(exc).__name__}: {exc}"[:2000], error_kind="internal")
        return EXIT_INTERNAL_ERROR
    _finish(run, "succeeded")
    return 0


def run_job(run: RunFolder) -> None:
    job = ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml")))
    run.update_run_info(state="running", started_at=time.time(), versions=versions(), host=platform.node())
    run.event("run_started", pid=os.getpid())
    prepare(run, job)
    fit(run, job)


def prepare(run: RunFolder, job: ResolvedJob) -> None:
    """Tokenize once on the driver; workers read the prepared examples from the run folder."""
    from tunerun.trainer.batches import save_examples
    from tunerun.trainer.data import prepare_data
    from tunerun.trainer.tokenizer import load_tokenizer

    if run.exists("data/data_report.json"):
        return  # a resumed run trains on exactly the data it started with
    prepared = prepare_data(job.spec.data, load_tokenizer(job), job.spec.training.seed)
    if not prepared.train:
        raise DataError(f"data.train {job.spec.data.train}: no training examples left after cleaning")
    save_examples(run.file("data/train.jsonl"), prepared.train)
    save_examples(run.file("data/eval.jsonl"), prepared.eval)
    report = dataclasses.asdict(prepared.report)
    run.write_json("data/data_report.json", report)
    run.event("data_prepared", **{k: report[k] for k in ("records_read", "train_records", "eval_records")})


def fit(run: RunFolder, job: ResolvedJob) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tunerun.trainer.loop import train_loop_per_worker

    resources = job.spec.resources
    env = {"DS_ACCELERATOR": "cpu"} if resources.gpus_per_worker == 0 else {}
    if not ray.is_initialized():
        _start_ray(job, env)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run_root": str(run.root), "run_id": run.run_id},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(job),
        ),
        run_config=RunConfig(
            name=run.run_id,
            storage_path=str(run.root),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.spec.checkpoint.keep_last),
            worker_runtime_env={"env_vars": env},
        ),
    )
    trainer.fit()


def _start_ray(job: ResolvedJob, env: dict) -> None:
    """Embedded Ray for the local target; an existing cluster when RAY_ADDRESS says so (Slurm, KubeRay)."""
    import ray

    os.environ.update(env)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    needed = job.spec.resources.num_workers * job.spec.resources.cpus_per_worker
    # Logical CPUs only gate scheduling: on a 2-core laptop two 1-CPU workers plus Ray's own actors must fit.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed + 1), include_dashboard=False, log_to_driver=True)


def _worker_resources(job: ResolvedJob) -> dict:
    resources = {"CPU": job.spec.resources.cpus_per_worker}
    if job.spec.resources.gpus_per_worker:
        resources["GPU"] = job.spec.resources.gpus_per_worker
    return resources


def _finish(run: RunFolder, state: str, **fields) -> None:
    run.update_run_info(state=state, finished_at=time.time(), **fields)
    run.event(f"run_{state}", **fields)


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
