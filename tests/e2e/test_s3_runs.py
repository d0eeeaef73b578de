"""Runs whose whole run folder lives on an S3 protocol server (moto on loopback, reached over HTTP by boto3 and
by Ray Train's pyarrow filesystem, as MinIO would be), with real faults: a killed run, a frozen server, a
corrupted checkpoint object. The QLoRA and full ZeRO-3 runs here are also those methods' end-to-end checks (their
loss falls, a 4-bit run resumes on fewer workers, ZeRO-3 exports weights plain transformers loads); LoRA on local
storage is test_methods.py's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from processes import session_pids
from test_methods import assert_loss_falls

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
pytestmark = pytest.mark.slow
# Evaluation still runs at every eval point (loss, generation, the forgetting sample) but on 8 examples of at most
# 16 new tokens: these tests are about storage, checkpoints and resume; the full-size eval is test_learning's.
LIGHT_EVAL = ["eval.max_examples=8", "eval.max_new_tokens=16"]


class S3Run:
    def __init__(self, s3_server, tiny_model_dir: Path, tmp_path: Path):
        self.server, self.tmp_path = s3_server, tmp_path
        self.bucket = s3_server.bucket(f"runs-{uuid.uuid4().hex[:10]}")
        self.storage = f"s3://{self.bucket}/team"
        self.sets = [f"model.path={tiny_model_dir}", f"storage.uri={self.storage}",
                     f"storage.endpoint_url={s3_server.endpoint}",
                     f"data.train={REPO / 'examples/data/support_tickets.jsonl'}", *LIGHT_EVAL]
        self.env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_server.endpoint}

    def command(self, verb: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "tunerun.jobs.cli", verb, *args]

    def start(self, *overrides: str, run_id: str, resume: bool = False) -> subprocess.Popen:
        sets = [a for s in [*self.sets, *overrides] for a in ("--set", s)]
        which = ["--resume", run_id] if resume else ["--run-id", run_id]
        return subprocess.Popen(self.command("run", str(QUICKSTART), *sets, *which), cwd=self.tmp_path,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *overrides: str, run_id: str, resume: bool = False) -> subprocess.CompletedProcess:
        process = self.start(*overrides, run_id=run_id, resume=resume)
        out, err = process.communicate(timeout=900)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args, "--storage", self.storage), env=self.env, capture_output=True,
                              text=True, timeout=120)

    def key(self, run_id: str, name: str) -> str:
        return f"team/{run_id}/{name}"

    def read(self, run_id: str, name: str) -> bytes:
        return self.server.client().get_object(Bucket=self.bucket, Key=self.key(run_id, name))["Body"].read()

    def jsonl(self, run_id: str, name: str) -> list[dict]:
        return [json.loads(line) for line in self.read(run_id, name).decode().splitlines()]

    def keys(self, run_id: str, prefix: str = "") -> list[str]:
        pages = self.server.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(run_id, prefix))
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def wait_for(self, run_id: str, name: str, process: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.keys(run_id, name):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{name} never appeared"
            time.sleep(0.3)

    def train_losses(self, run_id: str) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in self.jsonl(run_id, "metrics.jsonl") if "loss" in m}


@pytest.fixture
def s3run(s3_server, tiny_model_dir, tmp_path) -> S3Run:
    return S3Run(s3_server, tiny_model_dir, tmp_path)


# One quickstart job, run once per module through an outage (test_server_outage_during_training_is_ridden_out)
# and taken, by the kill test, as the same job run without interruption of its training: a frozen store only
# delays uploads, so its losses are the reference a killed-and-resumed run must match.
SHARED_JOB = ["training.max_steps=30", "checkpoint.every_steps=5", "checkpoint.keep_last=10", "eval.every_steps=30"]


@pytest.fixture(scope="module")
def run_through_outage(s3_server, tiny_model_dir, tmp_path_factory) -> tuple[S3Run, subprocess.CompletedProcess]:
    """SHARED_JOB as run "outage": the object store freezes for 6 s after the first checkpoint."""
    s3run = S3Run(s3_server, tiny_model_dir, tmp_path_factory.mktemp("outage"))
    process = s3run.start(*SHARED_JOB, run_id="outage")
    s3run.wait_for("outage", "checkpoints/step-000005/manifest.json", process)
    s3run.server.freeze()
    try:
        time.sleep(6)
    finally:
        s3run.server.thaw()
    out, err = process.communicate(timeout=600)
    return s3run, subprocess.CompletedProcess(process.args, process.returncode, out, err)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_qlora_run_lives_on_s3_and_resume_skips_a_corrupted_checkpoint(s3run, tiny_model_dir):
    """Model, data and run folder all on the object store; the model loads through the node cache. A 4-bit base
    with adapters trains on 2 workers, and is resumed by 1: adapter, optimizer and data position are not sharded
    by rank."""
    s3 = s3run.server.client()
    for path in tiny_model_dir.iterdir():
        s3.upload_file(str(path), s3run.bucket, f"models/tiny/{path.name}")
    s3.upload_file(str(REPO / "examples/data/support_tickets.jsonl"), s3run.bucket, "datasets/tickets.jsonl")
    method = ["method.kind=qlora",
              "method.quantization={quant_type: nf4, double_quant: true, compute_dtype: bfloat16}",
              "checkpoint.every_steps=4", "checkpoint.keep_last=5", "eval.every_steps=8",
              f"model.path=s3://{s3run.bucket}/models/tiny", f"data.train=s3://{s3run.bucket}/datasets/tickets.jsonl"]
    s3run.env["TUNERUN_CACHE"] = str(s3run.tmp_path / "cache")
    result = ok(s3run.run(*method, "training.max_steps=8", run_id="q"))
    assert f"{s3run.storage}/q/final/adapter" in result.stdout
    assert (s3run.tmp_path / "cache" / "models" / s3run.bucket / "models" / "tiny" / "config.json").is_file()
    assert s3run.key("q", "final/adapter/adapter_model.safetensors") in s3run.keys("q", "final")
    info = json.loads(s3run.read("q", "run.json"))
    assert info["state"] == "succeeded"
    assert {"torch", "ray", "deepspeed", "transformers", "peft", "bitsandbytes"} <= set(info["versions"])
    assert_loss_falls(list(s3run.train_losses("q").values()))
    manifest = json.loads(s3run.read("q", "checkpoints/step-000008/manifest.json"))
    assert {f["path"] for f in manifest["files"]} >= {"trainable.safetensors", "optimizer.pt", "progress.json",
                                                      "rng-rank0.pt", "rng-rank1.pt"}
    status = ok(s3run.cli("status", "q"))
    assert "state succeeded" in status.stdout and "step 8/8" in status.stdout
    assert "q" in ok(s3run.cli("list")).stdout

    # same size, other bytes: only the sha256 in the manifest can tell
    key = s3run.key("q", "checkpoints/step-000008/trainable.safetensors")
    good = s3run.read("q", "checkpoints/step-000008/trainable.safetensors")
    s3run.server.client().put_object(Bucket=s3run.bucket, Key=key, Body=bytes(reversed(good)))
    refused = s3run.run(*method, "training.max_steps=10", run_id="q")
    assert refused.returncode == 2 and "already exists" in refused.stderr and "--resume q" in refused.stderr
    ok(s3run.run(*method, "training.max_steps=10", "resources.workers_per_node=1", run_id="q", resume=True))
    events = s3run.jsonl("q", "events.jsonl")
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped and "step-000008" in skipped[0]["detail"] and "sha256" in skipped[0]["detail"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [(e["step"], e["world_size"]) for e in resumed] == [(4, 1)]
    assert json.loads(s3run.read("q", "checkpoints/step-000004/progress.json"))["world_size"] == 2
    config = json.loads(s3run.read("q", "final/adapter/adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 16


def test_zero3_checkpoints_shard_to_s3_resume_and_export_loadable_weights(s3run, tiny_model_dir):
    method = ["method={kind: full, zero: {stage: 3}}", "training.learning_rate=1e-3", "checkpoint.every_steps=4",
              "eval.every_steps=8"]
    ok(s3run.run(*method, "training.max_steps=4", run_id="z"))
    shards = [k for k in s3run.keys("z", "checkpoints/step-000004") if k.endswith("optim_states.pt")]
    assert len(shards) == 2  # one optimizer partition per rank: ZeRO-3 really partitioned the states
    manifest = json.loads(s3run.read("z", "checkpoints/step-000004/manifest.json"))
    assert sum(f["path"].endswith("optim_states.pt") for f in manifest["files"]) == 2
    assert s3run.keys("z", "final/model/model.safetensors")
    ok(s3run.run(*method, "training.max_steps=8", run_id="z", resume=True))
    events = s3run.jsonl("z", "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resumed"] == [4]
    losses = s3run.train_losses("z")
    assert sorted(losses) == list(range(1, 9))  # nothing before the checkpoint trained twice
    assert_loss_falls(list(losses.values()))
    smaller = s3run.run(*method, "training.max_steps=10", "resources.workers_per_node=1", run_id="z", resume=True)
    assert smaller.returncode == 2
    assert "ZeRO shards of 2 workers" in smaller.stderr and "this launch has 1" in smaller.stderr

    from transformers import AutoModelForCausalLM

    exported = s3run.tmp_path / "exported"
    exported.mkdir()
    for key in s3run.keys("z", "final/model/"):
        s3run.server.client().download_file(s3run.bucket, key, str(exported / key.rsplit("/", 1)[1]))
    tuned = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert sum(not weights.equal(base[name]) for name, weights in tuned.items()) > 10


def test_killed_run_resumes_and_its_loss_matches_an_uninterrupted_run(s3run, run_through_outage):
    """Kill every process of the run (a lost node) after a checkpoint; `--resume` continues from the newest
    complete checkpoint with optimizer, scheduler, RNG and data position restored: the losses after the
    resume match those of the same job run without interruption (the module's shared run)."""
    straight, finished = run_through_outage
    ok(finished)
    reference = straight.train_losses("outage")
    assert max(reference) == 30

    process = s3run.start(*SHARED_JOB, run_id="killed")
    s3run.wait_for("killed", "checkpoints/step-000010/manifest.json", process)
    session = json.loads(s3run.read("killed", "run.json"))["local"]["pid"]
    for pid in session_pids(session):
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    ok(s3run.run(*SHARED_JOB, run_id="killed", resume=True))
    resumed = [e["step"] for e in s3run.jsonl("killed", "events.jsonl") if e["event"] == "resumed"]
    assert len(resumed) == 1 and 10 <= resumed[0] < 30
    losses = s3run.train_losses("killed")
    assert max(losses) == 30
    for step in range(resumed[0] + 1, 31):
        assert losses[step] == pytest.approx(reference[step], rel=1e-3, abs=1e-4), step


def test_server_outage_during_training_is_ridden_out(run_through_outage):
    """The object store freezes for 6 s mid-run: uploads wait and retry, the run finishes, every checkpoint
    it reports complete verifies."""
    s3run, finished = run_through_outage
    assert finished.returncode == 0, (finished.stdout, finished.stderr)
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.spec import StorageSpec
    from tunerun.trainer.checkpoint import latest_complete

    run = RunFolder(StorageSpec(uri=s3run.storage, endpoint_url=s3run.server.endpoint), "outage")
    folder, skipped = latest_complete(run, s3run.tmp_path / "verify")
    assert folder is not None and folder.name == "step-000030" and skipped == []


def test_missing_bucket_and_unreachable_endpoint_fail_before_training(s3run, tiny_model_dir):
    bad_bucket = s3run.run("storage.uri=s3://no-such-bucket/x", run_id="nb")
    assert bad_bucket.returncode == 2 and "bucket 'no-such-bucket' does not exist" in bad_bucket.stderr
    env = {**s3run.env, "AWS_MAX_ATTEMPTS": "2"}
    unreachable = subprocess.run(
        s3run.command("run", str(QUICKSTART), *[a for s in s3run.sets for a in ("--set", s)],
                      "--set", "storage.endpoint_url=http://127.0.0.1:9", "--run-id", "ur"),
        env=env, capture_output=True, text=True, timeout=300, cwd=s3run.tmp_path)
    assert unreachable.returncode == 2 and "did not answer" in unreachable.stderr
    assert "Traceback" not in bad_bucket.stderr + unreachable.stderr


def test_wrong_credentials_fail_before_training(s3run, s3_server_checking_credentials):
    env = {**s3run.env, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0", "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    sets = [*s3run.sets, f"storage.endpoint_url={s3_server_checking_credentials.endpoint}"]
    refused = subprocess.run(s3run.command("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                                           "--run-id", "wc"),
                             env=env, capture_output=True, text=True, timeout=300, cwd=s3run.tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "refused the credentials" in refused.stderr and "Traceback" not in refused.stderr
    assert "not-the-secret" not in refused.stdout + refused.stderr
