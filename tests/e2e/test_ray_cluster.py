"""`--target ray`: a real Ray cluster of two nodes on this machine, reached through its Job Submission API.

The fixture starts a head (`ray start --head --block`) and a second node (`ray start --address=…`), each as its
own process session with token authentication, free ports and its own temp dir, and ends exactly those
sessions afterwards (never `ray stop`, which would stop other people's Ray on this machine). Each node offers
one CPU, so the job's two Ray Train workers can only run one per node. The run folder lives on the S3 protocol
server (moto on loopback); the cluster's credentials are its own environment, never the job's.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from processes import session_pids

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
START_TIMEOUT_S = 120


def _node_ports(head: bool, free_port) -> list[str]:
    """Every port a Ray node opens, chosen free, so this cluster never collides with another Ray here."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port"]
    if head:
        names += ["ray-client-server-port"]
    return [f"--{name}={free_port()}" for name in names] + ["--min-worker-port=0", "--max-worker-port=0"]


def _end_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process of the session `ray start` led (raylet, GCS, workers), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and _live(session_pids(sid)):
            time.sleep(0.2)


def _live(pids: list[int]) -> bool:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


class RayCluster:
    def __init__(self, address: str, env: dict, token: str):
        self.address, self.env, self.token = address, env, token

    def get(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def job(self, submission_id: str, until: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED")) -> dict:
        """The Ray job's record once its status is one of ``until`` (the driver exits after run.json says so)."""
        deadline = time.monotonic() + 60
        while (job := self.get(f"/api/jobs/{submission_id}"))["status"] not in until:
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        return job

    def alive_nodes(self) -> int:
        try:
            nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return 0
        return sum(1 for node in nodes if node["state"] == "ALIVE")


@pytest.fixture(scope="module")
def ray_cluster(s3_server, free_port):
    temp = tempfile.mkdtemp(prefix="trr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    bin_dir = str(Path(sys.executable).parent)  # `python` in the job's entrypoint is this venv's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "TUNERUN_CACHE": f"{temp}/cache"}
    ray = str(Path(bin_dir) / "ray")
    gcs, dashboard = free_port(), free_port()
    common = ["--block", "--num-cpus=1", "--object-store-memory=200000000", "--node-ip-address=127.0.0.1",
              "--disable-usage-stats"]
    head = [ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp}", *common, *_node_ports(True, free_port)]
    worker = [ray, "start", f"--address=127.0.0.1:{gcs}", *common, *_node_ports(False, free_port)]
    cluster = RayCluster(f"http://127.0.0.1:{dashboard}", env, token)
    processes = []
    try:
        for command, log in ((head, "head.log"), (worker, "worker.log")):
            processes.append(subprocess.Popen(command, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                              stdout=open(f"{temp}/{log}", "wb"), stderr=subprocess.STDOUT))
            expected = len(processes)
            deadline = time.monotonic() + START_TIMEOUT_S
            while cluster.alive_nodes() < expected:
                assert all(p.poll() is None for p in processes), Path(f"{temp}/{log}").read_text()[-3000:]
                assert time.monotonic() < deadline, f"{log}: Ray node did not join in {START_TIMEOUT_S} s"
                time.sleep(0.5)
        yield cluster
    finally:
        for process in reversed(processes):
            _end_session(process.pid)
            process.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


class RayRuns:
    """Drives the CLI like a user whose shell has the Ray token and S3 settings."""

    def __init__(self, cluster: RayCluster, s3_server, tiny_model_dir: Path, tmp_path: Path):
        self.cluster, self.server, self.tmp_path = cluster, s3_server, tmp_path
        self.bucket = s3_server.bucket(f"ray-{uuid.uuid4().hex[:10]}")
        self.storage = f"s3://{self.bucket}/team"
        self.sets = [f"model.path={tiny_model_dir}", f"storage.uri={self.storage}",
                     f"storage.endpoint_url={s3_server.endpoint}",
                     f"data.train={REPO / 'examples/data/support_tickets.jsonl'}",
                     "eval.metrics=[loss]", "eval.general=null", "targets.ray.env_vars=[TUNERUN_E2E_MARKER]"]
        self.env = {**cluster.env, "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "TUNERUN_E2E_MARKER": "marker-42"}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", *args], env=self.env, cwd=self.tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, run_id: str, *sets: str) -> subprocess.CompletedProcess:
        args = [a for s in [*self.sets, *sets] for a in ("--set", s)]
        return self.cli("submit", str(QUICKSTART), "--target", "ray", "--address", self.cluster.address,
                        "--run-id", run_id, *args)

    def read(self, run_id: str, name: str) -> bytes:
        return self.server.client().get_object(Bucket=self.bucket, Key=f"team/{run_id}/{name}")["Body"].read()

    def run_info(self, run_id: str) -> dict:
        return json.loads(self.read(run_id, "run.json"))

    def wait(self, run_id: str, done, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.run_info(run_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                log = self.cli("logs", run_id, "--storage", self.storage).stdout
                pytest.fail(f"run {run_id} stuck: {info}\n{log[-4000:]}")
            time.sleep(1.0)

    def target_status(self, run_id: str) -> dict:
        """The ray target's `status(run)`, in a process whose environment holds the cluster's token like a user's
        shell."""
        code = ("import json, sys; from tunerun.cluster import targets; from tunerun.cluster.run_folder import "
                "RunFolder; from tunerun.jobs.spec import StorageSpec; print(json.dumps(targets.get('ray').status("
                "RunFolder(StorageSpec(uri=sys.argv[1], endpoint_url=sys.argv[2]), sys.argv[3])).to_json()))")
        result = subprocess.run([sys.executable, "-c", code, self.storage, self.server.endpoint, run_id],
                                env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    def metrics(self, run_id: str) -> list[dict]:
        try:
            return [json.loads(line) for line in self.read(run_id, "metrics.jsonl").decode().splitlines()]
        except self.server.client().exceptions.NoSuchKey:
            return []


@pytest.fixture
def ray_runs(ray_cluster, s3_server, tiny_model_dir, tmp_path) -> RayRuns:
    return RayRuns(ray_cluster, s3_server, tiny_model_dir, tmp_path)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.mark.slow
def test_a_job_trains_across_both_nodes_and_writes_its_run_folder_to_s3(ray_runs, ray_cluster):
    submitted = ok(ray_runs.submit("ray-e2e", "training.max_steps=4", "checkpoint.every_steps=2",
                                   "eval.every_steps=4"))
    assert f"Ray job tunerun-ray-e2e at {ray_cluster.address}" in submitted.stdout
    info = ray_runs.wait("ray-e2e", lambda i: i.get("state") in ("succeeded", "failed", "cancelled"))
    assert info["state"] == "succeeded", info
    assert info["target"] == "ray" and info["ray"]["submission_id"] == "tunerun-ray-e2e"
    assert max(m.get("step", 0) for m in ray_runs.metrics("ray-e2e") if "loss" in m) == 4
    assert json.loads(ray_runs.read("ray-e2e", "checkpoints/step-000004/manifest.json"))["files"]
    assert ray_runs.read("ray-e2e", "final/adapter/adapter_model.safetensors")

    job = ray_cluster.job("tunerun-ray-e2e")
    assert job["status"] == "SUCCEEDED"
    assert job["runtime_env"]["env_vars"] == {"TUNERUN_E2E_MARKER": "marker-42"}  # by name, nothing else
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(job)  # the cluster's own credentials were used
    workers = ray_cluster.get("/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
                              "&filter_values=RayTrainWorker")["data"]["result"]["result"]
    assert len({w["node_id"] for w in workers}) == 2, workers  # one training worker on each node

    view = ray_runs.target_status("ray-e2e")
    assert view["state"] == "succeeded" and view["ray"]["job_status"] == "SUCCEEDED"
    logs = ok(ray_runs.cli("logs", "ray-e2e", "--storage", ray_runs.storage))
    assert "tunerun.trainer" in logs.stdout and "ray-e2e" in logs.stdout


@pytest.mark.slow
def test_cancel_stops_the_ray_job_and_the_run_says_cancelled(ray_runs, ray_cluster):
    ok(ray_runs.submit("ray-cancel", "training.max_steps=5000", "checkpoint.every_steps=1000"))
    ray_runs.wait("ray-cancel", lambda i: bool(ray_runs.metrics("ray-cancel")) or i.get("state") == "failed")
    cancelled = ok(ray_runs.cli("cancel", "ray-cancel", "--storage", ray_runs.storage))
    assert "cancelled ray-cancel" in cancelled.stdout
    assert ray_runs.run_info("ray-cancel")["state"] == "cancelled"
    assert ray_cluster.job("tunerun-ray-cancel")["status"] == "STOPPED"
    assert ray_runs.target_status("ray-cancel")["ray"]["job_status"] == "STOPPED"


@pytest.mark.slow
def test_a_wrong_address_fails_before_any_run_folder_exists(ray_runs, ray_cluster, free_port):
    refused = ray_runs.cli("submit", str(QUICKSTART), "--target", "ray", "--address",
                           f"http://127.0.0.1:{free_port()}", "--run-id", "nowhere",
                           *[a for s in ray_runs.sets for a in ("--set", s)])
    assert refused.returncode == 2 and "cannot reach the Ray Job Submission API" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not ray_runs.server.client().list_objects_v2(Bucket=ray_runs.bucket, Prefix="team/nowhere/").get("Contents")


def test_credentials_are_refused_as_runtime_env_variables_and_render_shows_the_request(tmp_path, monkeypatch, stub_model_dir):
    model = stub_model_dir
    sets = ["--set", f"model.path={model}", "--set", f"data.train={REPO / 'examples/data/support_tickets.jsonl'}"]
    env = {**os.environ, "TUNERUN_E2E_MARKER": "shown"}
    command = [sys.executable, "-m", "tunerun.jobs.cli", "render", str(QUICKSTART), "--target", "ray", "--run-id", "r1"]
    refused = subprocess.run([*command, *sets, "--set", "targets.ray.env_vars=[AWS_SECRET_ACCESS_KEY]"], env=env,
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert refused.returncode == 2 and "looks like a credential" in refused.stderr
    rendered = subprocess.run([*command, *sets, "--set", "targets.ray.env_vars=[TUNERUN_E2E_MARKER, NOT_SET_HERE]"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    import yaml

    request = yaml.safe_load(rendered.stdout)
    assert request["submission_id"] == "tunerun-r1"
    assert request["entrypoint"] == f"python -m tunerun.trainer {tmp_path / 'runs' / 'r1'}"
    assert request["runtime_env"] == {"env_vars": {"TUNERUN_E2E_MARKER": "shown"}}
    assert "not passed: NOT_SET_HERE" in rendered.stdout
