"""A project's Slurm placement and its pending reason, through the service on the real Slurm daemons (conftest.py).

The test sets up a partition limit (a partition of its own with ``MaxCPUsPerNode=1``), fills it with a plain job,
and creates a fine-tuning job of project acme through the API: the job lands in the project's partition and
account (its #SBATCH lines), pends, and its status and events say why in words. Nothing trains: the job is
cancelled while it waits, so this costs seconds.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from tunerun.cluster.run_folder import SBATCH_SCRIPT
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.keys import KeyStore

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
PARTITION = "acme-gpu"
TEMPLATE = """
name: support
model: {path: MODEL}
method: {kind: lora}
data: {eval_fraction: 0.1, max_seq_len: 128}
training: {epochs: 1, micro_batch_size: 2, global_batch_size: 8}
resources: {workers_per_node: 1, cpus_per_worker: 1}
"""


@pytest.fixture
def one_cpu_partition(slurm_cluster):
    """A partition that lets its jobs use one CPU of the node at a time, already taken by a plain job."""
    host = socket.gethostname()
    subprocess.run(["scontrol", "create", f"PartitionName={PARTITION}", f"Nodes={host}", "MaxCPUsPerNode=1",
                    "State=UP"], check=True, capture_output=True)
    blocker = subprocess.run(["sbatch", "--parsable", f"--partition={PARTITION}", "--cpus-per-task=1",
                              "--output=/dev/null", "--wrap=sleep 600"], check=True, capture_output=True,
                             text=True).stdout.strip()
    deadline = time.monotonic() + 30
    while _squeue(blocker, "%T") != "RUNNING":
        assert time.monotonic() < deadline, f"the blocking job did not start: {_squeue(blocker, '%T|%r')}"
        time.sleep(0.5)
    yield PARTITION
    subprocess.run(["scancel", blocker], capture_output=True)
    subprocess.run(["scancel", f"--partition={PARTITION}"], capture_output=True)
    deadline = time.monotonic() + 60  # a partition with jobs in it cannot be deleted
    while subprocess.run(["scontrol", "delete", f"PartitionName={PARTITION}"], capture_output=True).returncode:
        assert time.monotonic() < deadline, "the test partition could not be deleted"
        time.sleep(1)


def _squeue(job_id: str, fields: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", fields], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def service(tmp_path, stub_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "support.yaml").write_text(TEMPLATE.replace("MODEL", str(stub_model_dir)))
    (tmp_path / "server.yaml").write_text(
        "storage: {uri: ./runs}\ntarget: slurm\n"
        f"targets: {{slurm: {{python: {sys.executable}, log_dir: {tmp_path / 'slurm-logs'}, time: '00:10:00'}}}}\n"
        "models:\n  support-tiny: {job: support.yaml}\n"
        f"projects:\n  acme: {{slurm: {{partition: {PARTITION}}}}}\n")
    app = create_app(load_server_config(tmp_path / "server.yaml"))
    key = KeyStore(app.state.service.served.config.storage).create("acme")[1]
    yield app, openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                             http_client=TestClient(app, raise_server_exceptions=True))
    app.state.service.validator.shutdown()


def test_a_projects_job_lands_in_its_partition_and_pending_says_why(one_cpu_partition, service):
    app, api = service
    uploaded = api.files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    files = app.state.service.files
    files.validate("acme", uploaded.id, Path(files.data_uri("acme", uploaded.id)))
    job = api.fine_tuning.jobs.create(model="support-tiny", training_file=uploaded.id)

    run = app.state.service.jobs.store.open(job.id)
    assert f"#SBATCH --partition={PARTITION}\n" in run.read_text(SBATCH_SCRIPT)
    slurm_id = run.read_json("run.json")["slurm"]["job_id"]
    assert _squeue(slurm_id, "%P") == PARTITION
    deadline = time.monotonic() + 30  # the scheduler gives a reason on its next pass (sched_interval=2)
    while (reason := _squeue(slurm_id, "%r")) in ("None", ""):
        assert time.monotonic() < deadline, _squeue(slurm_id, "%T|%r")
        time.sleep(0.5)

    assert api.fine_tuning.jobs.retrieve(job.id).status == "queued"
    messages = [event.message for event in api.fine_tuning.jobs.list_events(job.id).data]
    # the partition's one CPU is taken: Slurm says Resources, the job's events say it in words
    assert reason == "Resources"
    assert "Job queued in the cluster: waiting for free nodes, CPUs or GPUs in the partition (Slurm: Resources)" \
        in messages, messages
    api.fine_tuning.jobs.cancel(job.id)
    assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
