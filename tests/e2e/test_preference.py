"""Preference tuning end to end, as OpenAI's flow runs it: supervised fine-tuning on a support history, then DPO
from that fine-tune (`tunerun run jobs/examples/dpo.yaml` with ``model.adapter`` = the SFT run's adapter; LoRA, 2
Ray workers), then the results commands.

The history (examples/make_preference_data.py --history) answers each ticket with its team, 40% in the house style
("Thank you for writing. Our billing team will answer you today.") and 60% curtly ("Team: billing."), so the SFT
model answers curtly when it decodes greedily. The pairs prefer the house style over the curt answer and over a
house-style answer naming the wrong team. ``eval.label_pattern`` catches the house style's opening, so
``label_accuracy`` against the preferred answers is the share of held-out answers in house style. Measured on 2
cores while another test suite ran (90 SFT steps, then 84 DPO steps; 104 s for this module): house style 0.30 (the
SFT model: DPO's base evaluation) → 1.00, held-out reward accuracy 0.00 → 1.00 (0.94 after 56 DPO steps), exact
match against the preferred answer 0.12 → 0.90.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SFT_SPEC, DPO_SPEC = REPO / "jobs" / "examples" / "quickstart.yaml", REPO / "jobs" / "examples" / "dpo.yaml"
HOUSE_STYLE = "Thank you for writing. Our "


def sets(model: Path, storage: Path, *extra: str) -> list[str]:
    # Evaluated before the first step and at the end only: each eval generates every held-out answer.
    overrides = [f"model.path={model}", f"storage.uri={storage}", "eval.every_steps=1000",
                 "checkpoint.every_steps=1000", "eval.max_new_tokens=32", *extra]
    return [a for s in overrides for a in ("--set", s)]


def run(tunerun, spec: Path, cwd: Path, run_id: str, *overrides: str) -> Path:
    result = tunerun("run", str(spec), *overrides, "--run-id", run_id, cwd=cwd, timeout=900)
    folder = cwd / "runs" / run_id
    log = (folder / "logs" / "driver.log").read_text() if (folder / "logs" / "driver.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-4000:]}"
    return folder


@pytest.fixture(scope="module")
def preferred(tmp_path_factory, tunerun, tiny_model_dir, example_module) -> Path:
    """The DPO run, started from the SFT run's adapter."""
    cwd = tmp_path_factory.mktemp("dpo")
    history = example_module("make_preference_data").make_preference_data(cwd / "history.jsonl", 800, seed=1,
                                                                          history=True)
    sft = run(tunerun, SFT_SPEC, cwd, "sft", *sets(tiny_model_dir, cwd / "runs", f"data.train={history}"))
    return run(tunerun, DPO_SPEC, cwd, "dpo", *sets(
        tiny_model_dir, cwd / "runs", f"model.adapter={sft / 'final' / 'adapter'}", "training.epochs=3",
        f"data.train={REPO / 'examples/data/support_preferences.jsonl'}",
        "eval.label_pattern='^(Thank you for writing)'"))


def test_dpo_after_sft_makes_the_preferred_style_the_rule(preferred):
    evals = [r for r in map(json.loads, (preferred / "metrics.jsonl").open()) if "eval_reward_accuracy" in r]
    sft, final = evals[0], evals[-1]  # the base evaluation of a run started from an adapter is that adapter's
    print(f"\nhouse style {sft['eval_label_accuracy']:.2f} → {final['eval_label_accuracy']:.2f}, reward accuracy "
          f"{sft['eval_reward_accuracy']:.2f} → {final['eval_reward_accuracy']:.2f}, exact match "
          f"{sft['eval_exact_match']:.2f} → {final['eval_exact_match']:.2f}")
    assert sft["base"] and sft["eval_reward_accuracy"] == 0.0  # the reference itself: every margin is 0
    assert sft["eval_label_accuracy"] <= 0.5 < 0.9 <= final["eval_label_accuracy"]
    assert final["eval_label_accuracy"] - sft["eval_label_accuracy"] >= 0.4
    assert final["eval_reward_accuracy"] >= 0.9 and final["eval_reward_margin"] > 0
    assert "eval_perplexity" not in final  # a pair's loss has no perplexity
    examples = json.loads((preferred / "eval" / f"step-{final['step']:06d}.json").read_text())["examples"]
    assert all(e["output"].startswith(HOUSE_STYLE) for e in examples), [e["output"] for e in examples]
    report = json.loads((preferred / "data" / "data_report.json").read_text())
    assert report["format"] == "openai_preference" and report["train_records"] > 400
    adapter = preferred / "final" / "adapter"  # the trained adapter alone, not the frozen reference beside it
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "reference").exists()


def test_the_results_commands_show_a_dpo_run(preferred, tunerun):
    storage = preferred.parent
    status = tunerun("status", "dpo", "--storage", str(storage), cwd=storage.parent)
    assert status.returncode == 0 and "succeeded" in status.stdout, status.stdout + status.stderr
    tunerun("report", "dpo", "--storage", str(storage), cwd=storage.parent)
    page = (preferred / "report.html").read_text()
    assert "reward_accuracy" in page and "reward_margin" in page


@pytest.fixture(scope="module")
def full_dpo(tmp_path_factory, tunerun, tiny_model_dir) -> Path:
    """DPO as a full fine-tune under ZeRO-3 on 2 workers, from the base: 8 steps, then resumed to 12 steps."""
    cwd = tmp_path_factory.mktemp("full-dpo")
    overrides = [f"model.path={tiny_model_dir}", f"storage.uri={cwd / 'runs'}",
                 f"data.train={REPO / 'examples/data/support_preferences.jsonl'}", "method={kind: full, zero: {stage: 3}}",
                 "training.learning_rate=1e-4", "eval.max_new_tokens=8", "eval.every_steps=4",
                 "checkpoint.every_steps=4"]
    sets = [a for s in overrides for a in ("--set", s)]
    folder = run(tunerun, DPO_SPEC, cwd, "full", *sets, "--set", "training.max_steps=8")
    resumed = tunerun("run", str(DPO_SPEC), *sets, "--set", "training.max_steps=12", "--resume", "full", cwd=cwd,
                      timeout=900)
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    return folder


def test_a_full_fine_tune_trains_dpo_against_the_reference_it_computed_once(full_dpo):
    from tunerun.cluster.run_folder import REFERENCE_LOGPS

    events = [json.loads(line) for line in (full_dpo / "events.jsonl").open()]
    ready = [e for e in events if e["event"] == "reference_ready"]
    table = json.loads((full_dpo / REFERENCE_LOGPS).read_text())
    pairs = len(table["train"]["pairs"]) + len(table["eval"]["pairs"])
    # the first launch computed it with the untrained model; the resumed one, whose model had trained, read it back
    assert [(e["source"], e["pairs"]) for e in ready] == [("computed", pairs), ("stored", pairs)]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [8]
    evals = [r for r in map(json.loads, (full_dpo / "metrics.jsonl").open()) if "eval_reward_accuracy" in r]
    base, final = evals[0], evals[-1]
    print(f"\nfull ZeRO-3 DPO: reward accuracy {base['eval_reward_accuracy']:.2f} → {final['eval_reward_accuracy']:.2f},"
          f" margin {base['eval_reward_margin']:.4f} → {final['eval_reward_margin']:.4f}, reference "
          f"{ready[0]['seconds']} s")
    assert base["base"] and base["eval_reward_accuracy"] == 0.0 and abs(base["eval_reward_margin"]) < 1e-3
    # the policy before training is the reference: the table's chosen answers are the base eval's
    chosen = [c for c, _ in table["eval"]["pairs"]]
    assert base["eval_chosen_logp"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-3)
    assert final["step"] == 12 and final["eval_reward_margin"] > 0 and final["eval_reward_accuracy"] >= 0.6
    assert (full_dpo / "final" / "model").is_dir()


def test_data_inspect_marks_the_prompt_the_chosen_and_the_rejected_answer(tunerun, tiny_model_dir, tmp_path):
    shown = tunerun("data", "inspect", str(DPO_SPEC), *sets(tiny_model_dir, tmp_path / "runs"), "-n", "2",
                    "--cache-dir", str(tmp_path / "cache"), cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "(openai_preference)" in out and out.count("a preference pair") == 2
    assert "⟦Thank you for writing. Our" in out and "⟪" in out
