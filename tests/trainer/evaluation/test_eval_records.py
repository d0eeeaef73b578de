"""Judging an eval record: the gates, the forgetting drop, what needs an eval set; and the eval spec they read."""
from __future__ import annotations

import pytest

from tunerun.jobs.errors import DataError, SpecError
from tunerun.jobs.loader import load_job_text
from tunerun.trainer.evaluation import records

SPEC = "model: {path: /m}\ndata: {train: /d.jsonl}\n"


# ── gates ───────────────────────────────────────────────────────────────────────────────────────────────────


def test_gates_pass_fail_and_an_unmeasured_metric_fails():
    spec = load_job_text(SPEC + "eval:\n  label_pattern: 'x(y)'\n  gates:\n    exact_match: '>= 0.8'\n"
                                "    forgetting_drop: '<= 0.05'\n    label_accuracy: '> 0.5'\n").eval
    result = records.apply_gates(spec, {"exact_match": 0.9, "forgetting_drop": 0.2, "label_accuracy": None})
    assert not result["passed"]
    assert [(r["metric"], r["passed"]) for r in result["results"]] == [
        ("exact_match", True), ("forgetting_drop", False), ("label_accuracy", False)]
    assert result["results"][0]["condition"] == ">= 0.8"
    assert records.apply_gates(spec, {"exact_match": 0.8, "forgetting_drop": 0.05, "label_accuracy": 0.6})["passed"]


def test_forgetting_drop_is_base_minus_final_on_the_general_sample():
    spec = load_job_text(SPEC + "eval: {forgetting_metric: f1, forgetting_threshold: 0.1}\n").eval
    base, final = {"general": {"f1": 0.5}}, {"general": {"f1": 0.3}}
    assert records.forgetting(spec, base, final) == {"forgetting_drop": pytest.approx(0.2), "forgetting_flagged": True}
    assert records.forgetting(spec, None, final) == {}


def test_gates_on_eval_metrics_need_an_eval_set():
    spec = load_job_text(SPEC + "eval: {gates: {exact_match: '>= 0.5'}}\n").eval
    with pytest.raises(DataError, match="eval.gates on exact_match need an evaluation set"):
        records.require_eval_set(spec, "data/eval.jsonl holds no examples")
    records.require_eval_set(load_job_text(SPEC + "eval: {gates: {forgetting_drop: '<= 0.1'}}\n").eval, "none")


# ── the spec ────────────────────────────────────────────────────────────────────────────────────────────────


def problems_of(text: str) -> str:
    with pytest.raises(SpecError) as info:
        load_job_text(text)
    return str(info.value)


def test_spec_defaults():
    spec = load_job_text(SPEC).eval
    assert spec.max_new_tokens == 64 and spec.max_examples == 200 and spec.general == "default"
    assert spec.computed_metrics() == ["exact_match", "f1", "rouge_l", "loss", "perplexity", "forgetting_drop"]


def test_every_bad_gate_is_reported_at_once_naming_the_gate():
    text = SPEC + ("eval:\n  metrics: [loss, exact_match]\n  general: null\n  gates:\n"
                   "    exact_matc: '>= 0.8'\n    rouge_l: '>= 0.2'\n    exact_match: '=> 0.8'\n"
                   "    forgetting_drop: '<= 0.05'\n    loss: 0.3\n")
    message = problems_of(text)
    assert "5 problems" in message
    assert "eval.gates.exact_matc: unknown metric 'exact_matc' — did you mean 'exact_match'?" in message
    assert "eval.gates.rouge_l: metric 'rouge_l' is not computed by this job: add rouge_l to eval.metrics" in message
    assert "eval.gates.exact_match: expected a comparison such as '>= 0.8'" in message and "'=> 0.8'" in message
    assert "eval.gates.forgetting_drop: metric 'forgetting_drop' is not computed" in message
    assert "eval.gates.loss: expected a comparison" in message  # a bare number has no direction
    assert "line 7 " in message and "line 11" in message  # each problem points at its own line


def test_unknown_metric_name_bad_pattern_and_missing_general_file(tmp_path):
    message = problems_of(SPEC + "eval:\n  metrics: [loss, exact_macth]\n  label_pattern: '(unclosed'\n"
                                 f"  general: {tmp_path}/nope.jsonl\n")
    assert "eval.metrics.1" in message and "did you mean 'exact_match'" in message
    assert "eval.label_pattern: not a valid regular expression" in message
    assert "eval.general" in message and "does not exist" in message
    assert "label_accuracy needs eval.label_pattern" in problems_of(SPEC + "eval: {metrics: [label_accuracy]}\n")


def test_general_path_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "general.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert load_job_text(SPEC + "eval: {general: general.jsonl}\n").eval.general == str(tmp_path / "general.jsonl")


# ── during training: what rank 0 writes ─────────────────────────────────────────────────────────────────────


def test_base_and_final_records_the_forgetting_check_and_the_verdict(tmp_path, tiny_model_dir, make_run,
                                                                     add_eval_set, tokenizer):
    """The same weights at the base and the final eval: the forgetting drop is 0, the exact-match gate fails, and
    run.json, the events, the records, the metrics row and the report all say so."""
    import torch

    from tunerun.trainer.data.pack import load_examples
    from tunerun.trainer.engines import EvalOnlyEngine
    from tunerun.trainer.objectives import objective_for

    run, job, tuned = make_run(tmp_path, tiny_model_dir, job_yaml=(
        "eval: {max_new_tokens: 4, max_examples: 8, gates: {exact_match: '>= 0.5', forgetting_drop: '<= 0.05'}}\n"))
    add_eval_set(run)
    engine = EvalOnlyEngine(tuned, torch.device("cpu"), objective_for(job.spec))
    eval_set = load_examples(run.local_path("data/eval.jsonl"))

    base_row = records.evaluate_during_training(engine, tokenizer, eval_set, job, run, 0, "base", rank=0)
    train_row = records.evaluate_during_training(engine, tokenizer, eval_set, job, run, 1, "train", rank=0)
    final_row = records.evaluate_during_training(engine, tokenizer, eval_set, job, run, 2, "final", rank=0)

    base, final = run.read_json("eval/base.json"), run.read_json("eval/step-000002.json")
    assert base["base"] and "general" in base and "gates" not in base
    assert "general" not in run.read_json("eval/step-000001.json")  # the general sample: base and final only
    assert final["metrics"]["forgetting_drop"] == 0.0 and final["metrics"]["forgetting_flagged"] is False
    assert [(g["metric"], g["passed"]) for g in final["gates"]["results"]] == [("exact_match", False),
                                                                               ("forgetting_drop", True)]
    assert run.read_json("run.json")["gates"] == final["gates"]
    assert [e["passed"] for e in run.read_jsonl("events.jsonl") if e["event"] == "gates_checked"] == [False]
    assert run.exists("report.html")
    assert base_row["base"] is True and "base" not in final_row and "general_exact_match" not in train_row
    assert {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_generated", "general_exact_match",
            "forgetting_drop", "forgetting_flagged"} <= set(final_row)
    assert final_row["eval_loss"] == base_row["eval_loss"] == final["metrics"]["loss"]
