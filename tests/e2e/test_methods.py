"""End to end through the CLI, as a user runs it: `tunerun run` of the quickstart (LoRA) on an embedded Ray with 2
CPU workers and local storage.

It trains the tiny Llama from `examples/make_tiny_model.py` (loaded through `from_pretrained`, the path a real 8B
model takes), writes checkpoints with manifests and a final adapter, keeps the newest and the best, and its loss
falls. The other methods' runs share one launch with the checks of their storage: QLoRA (resumed on fewer workers)
and full ZeRO-3 (exported weights plain transformers loads) in test_s3_runs.py, QLoRA + ZeRO-3 in
test_qlora_zero3.py, DPO in test_preference.py.
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


def assert_loss_falls(losses: list[float]) -> None:
    """The training curve of a run (test_s3_runs.py's method runs are judged by it too)."""
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * (sum(losses[:2]) / 2), losses


def test_lora_quickstart_trains_and_held_out_loss_falls(tunerun, tmp_path, tiny_model_dir):
    result, run = run_job(tunerun, tmp_path, tiny_model_dir, "training.max_steps=24", "checkpoint.every_steps=6",
                          "eval.every_steps=6", "checkpoint.keep_last=1", "checkpoint.keep_best=1",
                          "checkpoint.best_metric=exact_match")
    assert_run_succeeded(result, run)
    assert_loss_falls(train_losses(run))
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
