"""The Slurm target against real Slurm daemons (see conftest.py): submit, follow, signal/requeue, cancel.

The run folder lives on the loopback S3 server; credentials reach the job by name through --export.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture
def slurm_job(slurm_cluster, s3_server, tiny_model_dir, tmp_path):
    bucket = s3_server.bucket(f"slurm-{uuid.uuid4().hex[:10]}")
    storage = f"s3://{bucket}/runs"
    sets = [f"model.path={tiny_model_dir}", f"data.train={REPO / 'examples/data/support_tickets.jsonl'}",
            f"storage.uri={storage}", f"storage.endpoint_url={s3_server.endpoint}",
            "resources.workers_per_node=1", "training.global_batch_size=8",
            f"targets.slurm.python={sys.executable}", f"targets.slurm.log_dir={tmp_path / 'slurm-logs'}",
            "targets.slurm.export=[RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S]",
            # every eval point still evaluates (loss, generation, forgetting), on 8 examples of ≤ 16 new tokens
            "eval.max_examples=8", "eval.max_new_tokens=16"]
    # Exported to the job by name: no 30 s drain of the Ray head on the SIGTERM that ends the job (scancel, the
    # requeue, the batch script's cleanup), as in test_slurm_nodes.py. Under scancel the GCS dies with the rest,
    # so the drain only waits out its timeout: cancelling took ~50 s of CANCEL_GRACE_S's 60 on a loaded machine.
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "TUNERUN_CACHE": str(tmp_path / "cache"),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    def submit(run_id: str, *overrides: str) -> str:
        args = [a for s in [*sets, *overrides] for a in ("--set", s)]
        result = cli("submit", str(QUICKSTART), "--target", "slurm", *args, "--run-id", run_id)
        assert result.returncode == 0, result.stderr
        return json.loads(read(run_id, "run.json"))["slurm"]["job_id"]

    def read(run_id: str, name: str) -> bytes:
        return s3_server.client().get_object(Bucket=bucket, Key=f"runs/{run_id}/{name}")["Body"].read()

    def status(run_id: str) -> dict:
        result = cli("status", run_id, "--storage", storage, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_state(run_id: str, states: set[str], timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while (info := status(run_id))["state"] not in states:
            assert time.monotonic() < deadline, (info, _job_output(tmp_path))
            time.sleep(2)
        return info

    def events(run_id: str) -> list[dict]:
        return [json.loads(line) for line in read(run_id, "events.jsonl").decode().splitlines()]

    def exists(run_id: str, name: str) -> bool:
        found = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_id}/{name}")
        return bool(found.get("Contents"))

    return type("SlurmJob", (), {"submit": staticmethod(submit), "status": staticmethod(status),
                                 "wait_state": staticmethod(wait_state), "events": staticmethod(events),
                                 "exists": staticmethod(exists), "cli": staticmethod(cli),
                                 "read": staticmethod(read), "storage": storage})


def _job_output(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in (tmp_path / "slurm-logs").glob("*.out"))


def test_qlora_job_runs_under_slurm_and_status_shows_it_completed(slurm_job):
    job_id = slurm_job.submit("sq", "method.kind=qlora", "training.max_steps=6", "checkpoint.every_steps=3")
    info = slurm_job.wait_state("sq", {"succeeded", "failed"})
    assert info["state"] == "succeeded", info
    assert info["slurm"]["job_id"] == job_id
    script = slurm_job.read("sq", "slurm/train.sbatch").decode()
    assert "#SBATCH --export=" in script and "testing" not in script  # credentials by name only
    assert slurm_job.exists("sq", "final/adapter/adapter_model.safetensors")
    human = slurm_job.cli("status", "sq", "--storage", slurm_job.storage)
    assert "state succeeded" in human.stdout and "target slurm" in human.stdout


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm_job):
    # The stop lands ~5 s after the step-20 checkpoint shows (S3 poll, scancel, the driver's handler, the workers'
    # 2 s poll): on a fast machine that is 60 steps and more, and an 80-step run ended before it stopped (seen).
    # 200 steps leave room; one evaluation at the end keeps them cheap where steps are slow.
    job_id = slurm_job.submit("sr", "training.max_steps=200", "checkpoint.every_steps=20", "eval.every_steps=200")
    deadline = time.monotonic() + 400
    while not slurm_job.exists("sr", "checkpoints/step-000020/manifest.json"):
        assert time.monotonic() < deadline
        time.sleep(1)
    # What Slurm sends at --signal=B:USR1@120: the batch shell's trap forwards it to the driver.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = slurm_job.wait_state("sr", {"succeeded", "failed"}, timeout=900)
    assert info["state"] == "succeeded", info
    kinds = [(e["event"], e.get("step")) for e in slurm_job.events("sr")]
    stopped = [step for kind, step in kinds if kind == "stopped_at_checkpoint"]
    resumed = [step for kind, step in kinds if kind == "resumed"]
    assert stopped and resumed == stopped, kinds  # resumed exactly where it stopped
    assert ("run_preempted", None) in kinds and kinds.index(("run_preempted", None)) < kinds.index(
        ("resumed", resumed[0]))


def test_cancel_stops_the_slurm_job_and_marks_the_run_cancelled(slurm_job):
    job_id = slurm_job.submit("sc", "training.max_steps=100000", "checkpoint.every_steps=20")
    slurm_job.wait_state("sc", {"running"})
    deadline = time.monotonic() + 400
    while not slurm_job.exists("sc", "checkpoints/step-000020/manifest.json"):
        assert time.monotonic() < deadline
        time.sleep(1)
    result = slurm_job.cli("cancel", "sc", "--storage", slurm_job.storage, timeout=180)
    assert result.returncode == 0 and "cancelled sc" in result.stdout, result
    info = slurm_job.status("sc")
    assert info["state"] == "cancelled"
    assert subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip() == ""
