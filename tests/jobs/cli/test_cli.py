"""The CLI as a user meets it: validate, plan, bad input (exit 2, one message, no traceback), list/status."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path: Path, stub_model_dir: Path) -> Path:
    """A folder laid out like a user's project: a model folder (models/m) and a data file."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(100)))
    return tmp_path


def write_job(workdir: Path, text: str) -> Path:
    path = workdir / "job.yaml"
    path.write_text(text)
    return path


GOOD = """\
name: demo
model:
  path: ./models/m
data:
  train: data/train.jsonl
"""


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_validate_ok(tunerun, workdir):
    write_job(workdir, GOOD)
    result = tunerun("validate", "job.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "qlora" in result.stdout


def test_validate_reports_every_problem_with_line_and_suggestion(tunerun, workdir):
    write_job(workdir, GOOD + "training:\n  micro_batch_siz: 4\nresources:\n  workers_per_node: 0\n")
    result = tunerun("validate", "job.yaml", cwd=workdir)
    assert_user_error(result, "2 problems", "line 7", "did you mean 'micro_batch_size'", "line 9",
                      "resources.workers_per_node")


@pytest.mark.parametrize("text,fragments", [
    ("name: demo\nmodel: {path: ./m]\n", ["line 2, column"]),
    (GOOD + "training:\n  learning_rate: 1e-4\n  learning_rate: 2e-4\n", ["duplicate", "learning_rate"]),
    (GOOD + "extra: !!python/object/apply:os.system ['echo hi']\n", ["line 6"]),
    (GOOD + "training:\n  micro_batch_size: three\n", ["training.micro_batch_size", "three"]),
    (GOOD + "training:\n  micro_batch_size: 3\n", ["training.global_batch_size", "multiple of"]),
    (GOOD + "method:\n  kind: lora\n  zero: {stage: 3}\n", ["method.zero", "full or qlora", "not 'lora'"]),
    (GOOD + "method:\n  kind: qlora\n  zero: {stage: 2}\n", ["line 8", "method.zero.stage", "stage 3 only",
                                                              "remove method.zero to train QLoRA under DDP"]),
    (GOOD + "method:\n  kind: qlora\n  zero: {}\n  quantization: {compute_dtype: float16, quant_storage: bfloat16}\n",
     ["method.quantization.quant_storage", "compute dtype (float16)", "quant_storage: float16"]),
    (GOOD.replace("demo", "Bad Name!"), ["name", "bad-name"]),
    (GOOD.replace("./models/m", "./models/missing"), ["model.path", "does not exist"]),
    (GOOD.replace("data/train.jsonl", "data/nope.jsonl"), ["data.train", "data file not found"]),
])
def test_bad_specs_exit_2_with_one_clear_message(tunerun, workdir, text, fragments):
    write_job(workdir, text)
    assert_user_error(tunerun("validate", "job.yaml", cwd=workdir), *fragments)


def test_missing_job_file_is_a_user_error(tunerun, workdir):
    assert_user_error(tunerun("validate", "nope.yaml", cwd=workdir), "nope.yaml")


def test_set_overrides_are_validated_like_the_file(tunerun, workdir):
    write_job(workdir, GOOD)
    ok = tunerun("plan", "job.yaml", "--json", "--set", "training.max_steps=20", "--set", "method.kind=lora",
                 cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    job = json.loads(ok.stdout)
    assert job["spec"]["training"]["max_steps"] == 20 and job["spec"]["method"]["kind"] == "lora"
    assert job["steps"]["total_steps_estimate"] == 20
    bad = tunerun("validate", "job.yaml", "--set", "training.max_step=20", cwd=workdir)
    assert_user_error(bad, "did you mean 'max_steps'")


def test_plan_resolves_paths_batch_arithmetic_and_deepspeed(tunerun, workdir):
    write_job(workdir, GOOD + "method:\n  kind: full\n  zero: {stage: 3, offload_optimizer: true}\n"
                       "training:\n  micro_batch_size: 2\n  global_batch_size: 16\n  epochs: 2\n")
    result = tunerun("plan", "job.yaml", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    spec = job["spec"]
    assert spec["model"]["path"] == str(workdir / "models" / "m")
    assert spec["data"]["train"] == str(workdir / "data" / "train.jsonl")
    assert spec["storage"]["uri"] == str(workdir / "runs")
    assert job["steps"]["grad_accumulation"] == 4  # 2 workers × 2 micro × 4 = 16
    assert job["steps"]["train_records_estimate"] == 95  # 100 records, 5% held out
    assert job["steps"]["total_steps_estimate"] == 2 * 6  # ceil(95 / 16) per epoch
    ds = job["deepspeed"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    human = tunerun("plan", "job.yaml", cwd=workdir)
    assert "2 workers × 2 micro-batch × 4 accumulation = 16 global" in human.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_validates_and_opens_with_its_command(example, tmp_path):
    from tunerun.jobs.loader import load_job

    first = example.read_text().splitlines()[0]
    assert first == f"# tunerun run jobs/examples/{example.name}"
    spec = load_job(example)
    assert spec.name and spec.model.path


def test_status_and_list_read_the_run_folder(tunerun, tmp_path):
    run = tmp_path / "runs" / "demo-20261123-101500"
    (run / "checkpoints" / "step-000010").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"state": "succeeded", "target": "local", "method": "lora",
                                              "updated_at": time.time()}))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 0.25, "total_steps": 10, "lr": 1e-4, "tokens_per_s": 1.0}) + "\n")
    status = tunerun("status", "demo-20261123-101500", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "state succeeded" in status.stdout and "step 10/10" in status.stdout
    assert "0.2500" in status.stdout and "1 checkpoints" in status.stdout
    listing = tunerun("list", cwd=tmp_path)
    assert "demo-20261123-101500" in listing.stdout and "succeeded" in listing.stdout
    assert_user_error(tunerun("status", "nope", cwd=tmp_path), "no run 'nope'")


def test_resolved_job_round_trips_through_yaml(workdir):
    from tunerun.jobs.loader import load_job
    from tunerun.jobs.plan import ResolvedJob, resolve

    write_job(workdir, GOOD)
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        job = resolve(load_job("job.yaml"), run_id="demo-1")
    finally:
        os.chdir(cwd)
    again = ResolvedJob.model_validate(yaml.safe_load(yaml.safe_dump(job.model_dump(mode="json"))))
    assert again == job
