"""`tunerun compare`: run folders side by side, the best of each metric marked, different eval sets warned about.

The run folders are written here the way a run writes them (job.yaml, run.json, eval/*.json, the data report),
so the table can be checked against known numbers without training.
"""
from __future__ import annotations

import json
from pathlib import Path

from tunerun.cluster.compare import compare
from tunerun.cluster.run_folder import RunFolder, write_job
from tunerun.jobs.plan import resolve
from tunerun.jobs.spec import JobSpec

LLAMA = dict(model_type="llama", vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128)


def write_run(root: Path, run_id: str, *, loss: float, exact: float, train: str = "tickets.jsonl", lr=1e-3,
              passed=True) -> RunFolder:
    folder = root / run_id
    (folder / "eval").mkdir(parents=True)
    (folder / "data").mkdir()
    model = root / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA))
    (root / train).write_text('{"instruction": "hi", "output": "hello"}\n')
    spec = JobSpec.model_validate({
        "name": "support", "model": {"path": str(model)}, "method": {"kind": "lora"},
        "data": {"train": str(root / train), "eval": None, "eval_fraction": 0.1},
        "training": {"epochs": 2, "learning_rate": lr, "global_batch_size": 8, "micro_batch_size": 4,
                     "seed": 42}})
    write_job(RunFolder(str(root), run_id), resolve(spec, run_id=run_id))
    (folder / "run.json").write_text(json.dumps({"state": "succeeded", "method": "lora",
                                                 "gates": {"passed": passed, "results": []}}))
    (folder / "data" / "data_report.json").write_text(json.dumps({
        "records_read": 600, "malformed": 1, "empty": 0, "duplicates": 5, "near_duplicates": 3, "fuzzy_duplicates": 4,
        "too_long_dropped": 0, "train_records": 529, "eval_records": 58, "pii_masked": {"email": 20, "phone": 5}}))
    (folder / "eval" / "base.json").write_text(json.dumps({"step": 0, "metrics": {"loss": 9.0, "exact_match": 0.0}}))
    for step, scale in ((10, 2.0), (20, 1.0)):  # the newest evaluation is the one compared
        (folder / "eval" / f"step-{step:06d}.json").write_text(json.dumps(
            {"step": step, "metrics": {"loss": loss * scale, "exact_match": exact / scale, "f1": exact / scale}}))
    return RunFolder(str(root), run_id)


def test_the_best_of_each_metric_is_marked_in_its_direction(tmp_path):
    result = compare([write_run(tmp_path, "a", loss=0.5, exact=0.6), write_run(tmp_path, "b", loss=0.3, exact=0.6,
                                                                                 lr=2e-3, passed=False)])
    assert result.warnings == []
    assert result.best["loss"] == ["b"] and result.best["exact_match"] == ["a", "b"]  # a tie marks both
    a, b = result.runs
    assert (a.metrics["loss"], a.evaluated_step, a.base_metrics["loss"]) == (0.5, 20, 9.0)
    assert (a.gates_passed, b.gates_passed) == (True, False)
    assert b.hyperparameters["learning_rate"] == 2e-3 and a.data["pii_masked"] == 25 and a.data["malformed"] == 1


def test_dpo_runs_are_compared_on_their_preference_metrics_too(tmp_path):
    sft, dpo = write_run(tmp_path, "sft", loss=0.5, exact=0.6), write_run(tmp_path, "dpo", loss=0.6, exact=0.7)
    newest = tmp_path / "dpo" / "eval" / "step-000020.json"
    record = json.loads(newest.read_text())
    record["metrics"].update(reward_accuracy=0.9, reward_margin=1.5, chosen_logp=-10.0, rejected_logp=-30.0)
    newest.write_text(json.dumps(record))
    result = compare([sft, dpo])
    assert result.metrics[-5:] == ["reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                                   "forgetting_drop"]
    assert result.best["reward_accuracy"] == ["dpo"] and result.best["rejected_logp"] == ["dpo"]
    assert result.runs[0].metrics["reward_accuracy"] is None and result.to_json()["metrics"] == result.metrics
    assert "reward_accuracy" not in compare([sft, write_run(tmp_path, "sft2", loss=0.4, exact=0.6)]).metrics


def test_runs_on_different_eval_sets_are_not_ranked(tmp_path):
    result = compare([write_run(tmp_path, "v1", loss=0.5, exact=0.5),
                      write_run(tmp_path, "v2", loss=0.3, exact=0.7, train="tickets-v2.jsonl")])
    assert result.best == {}
    assert "different eval sets" in result.warnings[0] and "tickets-v2.jsonl" in result.warnings[0]


def test_the_cli_prints_the_table_and_json(tmp_path, tunerun):
    write_run(tmp_path, "a", loss=0.5, exact=0.4)
    write_run(tmp_path, "b", loss=0.3, exact=0.6)
    write_run(tmp_path, "c", loss=0.2, exact=0.9, train="other.jsonl")
    text = tunerun("compare", "a", "b", "--storage", str(tmp_path), cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    loss_line = next(line for line in text.stdout.splitlines() if line.strip().startswith("loss"))
    assert loss_line.split()[1:] == ["0.5000", "0.3000", "★"]
    as_json = json.loads(tunerun("compare", "a", "b", "--storage", str(tmp_path), "--json", cwd=tmp_path).stdout)
    assert as_json["best"]["exact_match"] == ["b"] and [r["run_id"] for r in as_json["runs"]] == ["a", "b"]
    warned = tunerun("compare", "a", "c", "--storage", str(tmp_path), cwd=tmp_path)
    assert warned.returncode == 0 and "different eval sets" in " ".join(warned.stdout.split())
    alone = tunerun("compare", "a", "--storage", str(tmp_path), cwd=tmp_path)
    assert alone.returncode == 2 and "two or more runs" in alone.stderr
    missing = tunerun("compare", "a", "nope", "--storage", str(tmp_path), cwd=tmp_path)
    assert missing.returncode != 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr
