"""A `--nodes 2` Slurm job on a real 2-node partition (see `slurm_two_nodes` in conftest.py): two slurmd, each in
its own network, UTS and mount namespace, joined by a bridge. The job forms a 2-node Ray cluster and trains with
one worker per node; the two workers reach each other (gloo) only over the bridge.

The run folder is a local folder on the filesystem the "nodes" share, as compute nodes share a cluster filesystem
(NFS, Lustre); the loopback S3 server would not be reachable from inside the node namespaces at 127.0.0.1.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
pytestmark = pytest.mark.slow
# Ray Train's worker-group listing as the controller prints it to the job output.
WORKER_LINE = re.compile(r"\(ip=([0-9.]+), pid=\d+\) world_rank=(\d+), local_rank=(\d+), node_rank=(\d+)")


def test_two_node_job_forms_a_two_node_ray_cluster_with_one_worker_per_node(slurm_two_nodes, tiny_model_dir,
                                                                            tmp_path):
    runs, log_dir = tmp_path / "runs", tmp_path / "slurm-logs"
    # Exported to the job by name: RAY_DEDUP_LOGS=0 keeps every worker's line in the job output; no 30 s drain
    # of the Ray head on the SIGTERM that ends it after the run (the default suits a preempted job).
    env = {**slurm_two_nodes["env"], "TUNERUN_CACHE": str(tmp_path / "cache"), "RAY_DEDUP_LOGS": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    sets = [f"model.path={tiny_model_dir}", f"data.train={REPO / 'examples/data/support_tickets.jsonl'}",
            f"storage.uri={runs}", "resources.nodes=2", "resources.workers_per_node=1",
            "training.global_batch_size=8", "training.max_steps=4", "checkpoint.every_steps=2",
            f"targets.slurm.python={sys.executable}", f"targets.slurm.log_dir={log_dir}",
            "targets.slurm.export=[RAY_DEDUP_LOGS,RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S]"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    def status() -> dict:
        result = cli("status", "two", "--storage", str(runs), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def job_output() -> str:
        return "\n".join(p.read_text(errors="replace") for p in log_dir.glob("*.out"))

    result = cli("submit", str(QUICKSTART), "--target", "slurm", *[a for s in sets for a in ("--set", s)],
                 "--run-id", "two")
    assert result.returncode == 0, result.stderr
    run = runs / "two"
    job_id = json.loads((run / "run.json").read_text())["slurm"]["job_id"]

    deadline = time.monotonic() + 600
    while (info := status())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, (info, job_output()[-4000:])
        time.sleep(2)
    assert info["state"] == "succeeded", (info, job_output()[-4000:])

    # Slurm's own verdict: the batch script exited 0 after Ray was torn down on both nodes. (No accounting
    # daemon here, so scontrol, which keeps ended jobs for MinJobAge, stands in for sacct.)
    deadline = time.monotonic() + 180
    while (shown := subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                                   env=env).stdout) and "JobState=COMPLETED" not in shown:
        assert "JobState=RUNNING" in shown or "JobState=COMPLETING" in shown, shown
        assert time.monotonic() < deadline, shown
        time.sleep(2)
    assert "NodeList=node[1-2]" in shown and "ExitCode=0:0" in shown, shown

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["event"] == "training_started")
    assert started["world_size"] == 2 and started["total_steps"] == 4
    assert events[-1]["event"] == "run_succeeded"
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4
    assert (run / "checkpoints/step-000004/manifest.json").is_file()
    assert (run / "final/adapter/adapter_model.safetensors").is_file()

    # One worker on each node: Ray Train's placement, from the job output. Both on one node would show one
    # address twice, with local ranks 0 and 1.
    output = job_output()
    nodes = slurm_two_nodes["nodes"]
    assert f"head node1 {nodes['node1']}:" in output, output[-4000:]
    workers = {int(rank): (ip, int(local), int(node)) for ip, rank, local, node in WORKER_LINE.findall(output)}
    assert sorted(workers) == [0, 1], output[-4000:]
    assert {ip for ip, _, _ in workers.values()} == set(nodes.values()), workers
    assert sorted(node for _, _, node in workers.values()) == [0, 1] and all(
        local == 0 for _, local, _ in workers.values()), workers
