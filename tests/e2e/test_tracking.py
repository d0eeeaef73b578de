"""Experiment tracking end to end: LoRA runs on the tiny model feed a real `mlflow server` (SQLite store, local
artifact root, loopback) and TensorBoard event files; the tests read them back with `MlflowClient` and
TensorBoard's own reader and compare them with the run folder's metrics.jsonl.

One tracked run is shared by most assertions (the server is frozen for a while in the middle of it: training
goes on, a warning is logged, the retries deliver everything); one more run is cancelled, then resumed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
CLI = [sys.executable, "-m", "tunerun.jobs.cli"]
SHORT_EVAL = ["eval.max_examples=4", "eval.max_new_tokens=8"]

pytestmark = pytest.mark.slow


def job_sets(root: Path, model: Path, server, experiment: str, *extra: str) -> list[str]:
    sets = [f"model.path={model}", f"data.train={TICKETS}", f"storage.uri={root / 'runs'}",
            f"tracking.mlflow={{tracking_uri: '{server.uri}', experiment: {experiment}, tags: {{team: support}}}}",
            *SHORT_EVAL, *extra]
    return [a for s in sets for a in ("--set", s)]


def tracking_env() -> dict:
    # Short client timeouts: the frozen server's requests fail (and are retried) within seconds.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def mlflow_run(server, run: Path):
    return server.client().get_run(json.loads((run / "run.json").read_text())["mlflow_run_id"])


def history(server, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in server.client().get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir, mlflow_server):
    """A 6-step LoRA run with MLflow and TensorBoard, the server frozen from step 1 until the trainer warns."""
    root = tmp_path_factory.mktemp("tracked")
    sets = job_sets(root, tiny_model_dir, mlflow_server, "acme-support", "training.max_steps=6",
                    "eval.every_steps=3", "checkpoint.every_steps=6", "tracking.tensorboard=true")
    process = subprocess.Popen([*CLI, "run", str(QUICKSTART), *sets, "--run-id", "tracked"], cwd=root,
                               env=tracking_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = root / "runs" / "tracked"
    log = run / "logs" / "driver.log"
    wait_for(lambda: (run / "metrics.jsonl").exists() and any("loss" in r for r in rows(run)), "a step", process)
    mlflow_server.freeze()
    try:
        wait_for(lambda: "did not take" in log.read_text(), "tracking warning in the driver log", timeout=120)
    finally:
        mlflow_server.thaw()
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, (out, err, log.read_text()[-3000:])
    return run


def test_params_and_tags_describe_the_resolved_job(tracked, mlflow_server):
    found = mlflow_run(mlflow_server, tracked)
    params, tags = found.data.params, found.data.tags
    assert params["run_id"] == "tracked" and params["spec.training.max_steps"] == "6"
    assert params["spec.method.kind"] == "lora" and json.loads(params["spec.eval.metrics"])
    assert tags["team"] == "support" and tags["tunerun.run_id"] == "tracked" and tags["tunerun.method"] == "lora"
    report = json.loads((tracked / "data" / "data_report.json").read_text())
    assert tags["tunerun.data.train_records"] == str(report["train_records"])
    assert tags["tunerun.model"] and tags["mlflow.runName"] == "tracked"
    assert mlflow_server.client().get_experiment(found.info.experiment_id).name == "acme-support"


def test_step_metrics_match_metrics_jsonl_despite_the_outage(tracked, mlflow_server):
    run_id = mlflow_run(mlflow_server, tracked).info.run_id
    steps = [r for r in rows(tracked) if "loss" in r and "eval_loss" not in r]
    for key in ("loss", "lr", "tokens_per_s"):
        assert history(mlflow_server, run_id, key) == pytest.approx({r["step"]: r[key] for r in steps}), key
    # two workers, one writer: world rank 0 alone logs, so every step is there once
    assert len(mlflow_server.client().get_metric_history(run_id, "loss")) == len(steps)
    assert "did not take" in (tracked / "logs" / "driver.log").read_text()  # the outage was seen and survived


def test_eval_metrics_with_the_base_at_step_0_and_the_verdict_at_the_end(tracked, mlflow_server):
    found = mlflow_run(mlflow_server, tracked)
    evals = {r["step"]: r for r in rows(tracked) if "eval_loss" in r}
    assert sorted(evals) == [0, 3, 6]
    for key in ("eval_loss", "eval_exact_match", "eval_rouge_l"):
        assert history(mlflow_server, found.info.run_id, key) == pytest.approx({s: r[key] for s, r in evals.items()})
    assert found.data.metrics["forgetting_drop"] == pytest.approx(evals[6]["forgetting_drop"])
    gates = json.loads((tracked / "run.json").read_text())["gates"]
    assert found.data.tags["tunerun.gates"] == ("passed" if gates["passed"] else "failed")
    assert found.info.status == "FINISHED"


def test_report_data_report_and_eval_jsons_are_artifacts(tracked, mlflow_server):
    client, run_id = mlflow_server.client(), mlflow_run(mlflow_server, tracked).info.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert "report.html" in top
    assert {a.path for a in client.list_artifacts(run_id, "data")} == {"data/data_report.json"}
    evals = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/base.json", "eval/step-000006.json"} <= evals


def test_tensorboard_reader_finds_the_loss_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    expected = {r["step"]: r["loss"] for r in rows(tracked) if "loss" in r and "eval_loss" not in r}
    assert loss == pytest.approx(expected, rel=1e-6)
    assert "eval_loss" in events.Tags()["scalars"]


def test_export_registers_a_model_version(tracked, mlflow_server, tunerun):
    result = tunerun("export", "tracked", "--storage", str(tracked.parent), "--mlflow-model", "acme-support-lora",
                     cwd=tracked.parent.parent, env=tracking_env())
    assert result.returncode == 0, result.stderr
    client = mlflow_server.client()
    versions = client.search_model_versions("name='acme-support-lora'")
    assert len(versions) == 1 and versions[0].run_id == mlflow_run(mlflow_server, tracked).info.run_id
    logged = versions[0].source.split("/artifacts/", 1)[1]  # model/<the exported folder's name>
    files = {a.path for a in client.list_artifacts(versions[0].run_id, logged)}
    assert logged.startswith("model/") and f"{logged}/adapter_model.safetensors" in files


def test_cancelled_run_is_killed_and_its_resume_continues_the_same_mlflow_run(tmp_path, tiny_model_dir,
                                                                            mlflow_server):
    """`tunerun cancel` ends the MLflow run KILLED (the driver's session is stopped, maybe before it could say
    so); `run --resume` reopens that run from run.json, so the curve has one step axis and no second start."""
    sets = job_sets(tmp_path, tiny_model_dir, mlflow_server, "resume", "training.max_steps=100000",
                    "checkpoint.every_steps=2", "checkpoint.keep_last=4", "eval.every_steps=100000",
                    "resources.workers_per_node=1")  # one worker: what is checked here is the driver's part
    submitted = subprocess.run([*CLI, "submit", str(QUICKSTART), *sets, "--run-id", "rs"], cwd=tmp_path,
                               env=tracking_env(), capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    run = tmp_path / "runs" / "rs"
    wait_for(lambda: (run / "checkpoints" / "step-000002" / "manifest.json").exists(), "checkpoint 2")
    cancelled = subprocess.run([*CLI, "cancel", "rs", "--storage", str(tmp_path / "runs")], capture_output=True,
                               text=True, timeout=60, env=tracking_env())
    assert cancelled.returncode == 0 and "cancelled rs" in cancelled.stdout, cancelled.stderr
    assert json.loads((run / "run.json").read_text())["state"] == "cancelled"
    mlflow_id = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    client = mlflow_server.client()
    assert client.get_run(mlflow_id).info.status == "KILLED"

    last = max(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/manifest.json"))
    end = last + 2
    resume_sets = [*sets, "--set", f"training.max_steps={end}"]
    resumed = subprocess.run([*CLI, "run", str(QUICKSTART), *resume_sets, "--resume", "rs"], cwd=tmp_path,
                             env=tracking_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stderr, (run / "logs" / "driver.log").read_text()[-3000:])
    assert json.loads((run / "run.json").read_text())["mlflow_run_id"] == mlflow_id
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # no second run
    loss_steps = sorted({m.step for m in client.get_metric_history(mlflow_id, "loss")})
    assert loss_steps == list(range(1, end + 1))  # one step axis, continued after the cancel
    assert client.get_run(mlflow_id).info.status == "FINISHED"
