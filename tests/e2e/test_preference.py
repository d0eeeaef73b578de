"""Preference tuning end to end, as a user runs it: `tunerun run jobs/examples/dpo.yaml` (DPO with the
preferred answer's own loss, LoRA, 2 Ray workers) on OpenAI-format preference pairs, then the results commands.

The pairs (examples/make_preference_data.py) prefer a house-style answer naming the ticket's team over a curt one
and over a house-style one naming the wrong team. Measured on 2 cores (56 steps, ~65 s): held-out reward accuracy
0.00 (base: the reference itself, every margin 0) → 0.76–0.80, exact match 0.00 → 0.27–0.47, house style in
every kept example. The thresholds leave room for thread-count noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "examples" / "dpo.yaml"
HOUSE_STYLE = "Thank you for writing. Our "


def sets(model: Path, storage: Path) -> list[str]:
    # Evaluated before the first step and at the end only: each eval generates every held-out answer.
    overrides = [f"model.path={model}", f"data.train={REPO / 'examples/data/support_preferences.jsonl'}",
                 f"storage.uri={storage}", "eval.every_steps=1000", "checkpoint.every_steps=1000"]
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def preferred(tmp_path_factory, tunerun, tiny_model_dir) -> Path:
    cwd = tmp_path_factory.mktemp("dpo")
    result = tunerun("run", str(SPEC), *sets(tiny_model_dir, cwd / "runs"), "--run-id", "dpo", cwd=cwd, timeout=900)
    run = cwd / "runs" / "dpo"
    log = (run / "logs" / "driver.log").read_text() if (run / "logs" / "driver.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-4000:]}"
    assert "reward_accuracy" in result.stdout  # the CLI's eval lines show the objective's metrics
    return run


def test_dpo_learns_the_preferred_answers(preferred):
    evals = [r for r in map(json.loads, (preferred / "metrics.jsonl").open()) if "eval_reward_accuracy" in r]
    base, final = evals[0], evals[-1]
    print(f"\nreward accuracy {base['eval_reward_accuracy']:.2f} → {final['eval_reward_accuracy']:.2f}, exact match "
          f"{base['eval_exact_match']:.2f} → {final['eval_exact_match']:.2f}, f1 {final['eval_f1']:.2f}")
    assert base["base"] and base["eval_reward_accuracy"] == 0.0 and base["eval_exact_match"] <= 0.05
    assert final["eval_reward_accuracy"] >= 0.6 and final["eval_reward_margin"] > 0
    assert final["eval_exact_match"] >= 0.15 and final["eval_f1"] >= 0.8
    assert "eval_perplexity" not in final  # a pair's loss has no perplexity
    examples = json.loads((preferred / "eval" / f"step-{final['step']:06d}.json").read_text())["examples"]
    assert all(e["output"].startswith(HOUSE_STYLE) for e in examples), [e["output"] for e in examples]
    report = json.loads((preferred / "data" / "data_report.json").read_text())
    assert report["format"] == "openai_preference" and report["train_records"] > 400


def test_the_results_commands_show_a_dpo_run(preferred, tunerun):
    storage = preferred.parent
    status = tunerun("status", "dpo", "--storage", str(storage), cwd=storage.parent)
    assert status.returncode == 0 and "succeeded" in status.stdout, status.stdout + status.stderr
    tunerun("report", "dpo", "--storage", str(storage), cwd=storage.parent)
    page = (preferred / "report.html").read_text()
    assert "reward_accuracy" in page and "reward_margin" in page


def test_data_inspect_marks_the_prompt_the_chosen_and_the_rejected_answer(tunerun, tiny_model_dir, tmp_path):
    shown = tunerun("data", "inspect", str(SPEC), *sets(tiny_model_dir, tmp_path / "runs"), "-n", "2",
                    "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "(openai_preference)" in out and out.count("a preference pair") == 2
    assert "⟦Thank you for writing. Our" in out and "⟪" in out
