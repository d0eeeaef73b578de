"""End to end through the CLI, as a user runs it: `tunerun run` on an embedded Ray with 2 CPU workers.

Each method trains the tiny Llama from `examples/make_tiny_model.py` (loaded through `from_pretrained`, the path
a real 8B model takes), writes checkpoints with manifests and a final artifact, and its loss falls.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def run_job(tunerun, tmp_path: Path, tiny_model_dir: Path, *overrides: str,
            resume: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    sets = [f"model.path={tiny_model_dir}", f"data.train={REPO / 'examples/data/support_tickets.jsonl'}",
            f"storage.uri={tmp_path / 'runs'}", *overrides]
    result = tunerun("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                     "--resume" if resume else "--run-id", "e2e", cwd=tmp_path, timeout=900)
    return result, tmp_path / "runs" / "e2e"


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def eval_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def assert_run_succeeded(result: subprocess.CompletedProcess, run: Path) -> dict:
    log = (run / "logs" / "driver.log").read_text() if (run / "logs" / "driver.log").exists() else ""
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nlog tail:\n{log[-4000:]}"
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "succeeded"
    assert {"torch", "ray", "deepspeed", "transformers", "peft", "bitsandbytes"} <= set(info["versions"])
    return info


def assert_complete_checkpoints(run: Path, expected_steps: list[int]) -> None:
    from tunerun.cluster.run_folder import verify

    folders = sorted((run / "checkpoints").glob("step-*"))
    assert [int(f.name.split("-")[1]) for f in folders] == expected_steps
    for folder in folders:
        assert verify(folder) is None
        manifest = json.loads((folder / "manifest.json").read_text())
        assert any(entry["path"] == "progress.json" for entry in manifest["files"])


def assert_relaunch_resumes(tunerun, tmp_path: Path, tiny_model_dir: Path, run: Path, overrides: list[str],
                            from_step: int, to_step: int) -> None:
    """`--resume` continues from the newest complete checkpoint, not from step 0."""
    before = train_losses(run)
    result, _ = run_job(tunerun, tmp_path, tiny_model_dir, *overrides, f"training.max_steps={to_step}", resume=True)
    assert_run_succeeded(result, run)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[-1]["step"] == from_step, resumed
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(from_step + 1) == 1  # nothing before the checkpoint was trained twice
    after = train_losses(run)[len(before):]
    assert after[0] < before[0], (before, after)  # the curve continues rather than restarts


def assert_loss_falls(run: Path) -> None:
    losses = train_losses(run)
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * (sum(losses[:2]) / 2), losses


def test_lora_quickstart_trains_and_held_out_loss_falls(tunerun, tmp_path, tiny_model_dir):
    result, run = run_job(tunerun, tmp_path, tiny_model_dir, "training.max_steps=24", "checkpoint.every_steps=6",
                          "eval.every_steps=6", "checkpoint.keep_last=1", "checkpoint.keep_best=1",
                          "checkpoint.best_metric=exact_match")
    assert_run_succeeded(result, run)
    assert_loss_falls(run)
    evals = eval_losses(run)
    assert evals[-1] < evals[0], evals
    assert "held-out loss" in result.stdout and "final/adapter" in result.stdout
    # keep_last 1 + keep_best 1: the newest, and the best exact match of the evals at 6, 12, 18, 24 (ties: newer)
    scores = {r["step"]: r["eval_exact_match"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if "eval_exact_match" in r and not r.get("base")}
    best = max(sorted(scores, reverse=True), key=scores.get)
    assert sorted(scores) == [6, 12, 18, 24]
    assert_complete_checkpoints(run, sorted({best, 24}))
    for step in {best, 24}:
        manifest = json.loads((run / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())
        assert manifest["metrics"]["exact_match"] == scores[step]
    adapter = run / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()


def test_qlora_trains_4bit_base_with_adapters(tunerun, tmp_path, tiny_model_dir):
    method = ["method.kind=qlora",
              "method.quantization={quant_type: nf4, double_quant: true, compute_dtype: bfloat16}",
              "checkpoint.every_steps=4", "eval.every_steps=8"]
    result, run = run_job(tunerun, tmp_path, tiny_model_dir, *method, "training.max_steps=8")
    assert_run_succeeded(result, run)
    assert_loss_falls(run)
    assert_complete_checkpoints(run, [4, 8])
    # saved by 2 workers, resumed by 1: adapter, optimizer and data position are not sharded by rank
    assert_relaunch_resumes(tunerun, tmp_path, tiny_model_dir, run, [*method, "resources.workers_per_node=1"],
                            from_step=8, to_step=10)
    resumed = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
               if '"resumed"' in line]
    assert resumed[-1]["world_size"] == 1
    progress = json.loads((run / "checkpoints" / "step-000008" / "progress.json").read_text())
    assert progress["world_size"] == 2
    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16


def test_full_zero3_trains_and_exports_loadable_weights(tunerun, tmp_path, tiny_model_dir):
    method = ["method={kind: full, zero: {stage: 3}}", "training.learning_rate=1e-3",
              "checkpoint.every_steps=4", "eval.every_steps=8"]
    result, run = run_job(tunerun, tmp_path, tiny_model_dir, *method, "training.max_steps=8")
    assert_run_succeeded(result, run)
    assert_loss_falls(run)
    assert_complete_checkpoints(run, [4, 8])
    # one optimizer-state shard per rank: ZeRO-3 really partitioned the states
    shards = list((run / "checkpoints" / "step-000008").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards

    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(run / "final" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in tuned.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert len(changed) > 10

    assert_relaunch_resumes(tunerun, tmp_path, tiny_model_dir, run, method, from_step=8, to_step=10)
