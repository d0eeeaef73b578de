"""What a job produced beyond OpenAI's objects (`tunerun.jobs.service.outcomes`), with no server and no training:
its evaluation (base vs tuned, every step, gates, examples side by side), its data report and the weights it has
to download. Each test writes the run folder by hand, as the trainer, rank 0 and `tunerun export` leave it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunerun.cluster.run_folder import RunFolder
from tunerun.jobs.service.errors import ApiError
from tunerun.jobs.service.outcomes import artifact, artifacts, data_report, evaluation

JOB_ID = "ftjob-0123456789abcdef01234567"
GATES = {"passed": True, "results": [{"metric": "exact_match", "rule": ">= 0.8", "value": 0.9, "passed": True}]}


def make_run(tmp_path: Path, files: dict[str, object] | None = None, **run_json) -> RunFolder:
    """``<tmp>/runs/<JOB_ID>/`` with run.json and ``files`` ({name: JSON value, or bytes}), as plain files."""
    folder = tmp_path / "runs" / JOB_ID
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": JOB_ID, "state": "succeeded", "target": "local",
                                                 **run_json}))
    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(json.dumps(content))
    return RunFolder(str(tmp_path / "runs"), JOB_ID)


def example(index: int, output: str) -> dict:
    return {"index": index, "prompt": f"ticket {index}:", "reference": f"category: c{index}", "output": output}


def record(step: int, phase: str, metrics: dict, examples: list[dict], **more) -> dict:
    """An eval record as `tunerun.trainer.evaluation.records.build_record` writes it."""
    return {"step": step, "phase": phase, "base": phase == "base", "time": 1_700_000_000.0 + step,
            "metrics": metrics, "examples": examples, **more}


BASE = record(0, "base", {"loss": 2.5, "perplexity": 12.18, "exact_match": 0.0, "f1": None},
              [example(i, f"base says {i}") for i in (0, 2, 3, 5, 6, 7)], general={"rouge_l": 0.31})
STEP_2 = record(2, "train", {"loss": 1.25, "exact_match": 0.5}, [example(i, f"step 2 says {i}") for i in (1, 2)])
FINAL = record(4, "final", {"loss": 0.25, "exact_match": 0.9, "rouge_l": None, "forgetting_drop": 0.01},
               [example(i, f"tuned says {i}") for i in (1, 2, 3, 4)], general={"rouge_l": 0.3}, gates=GATES)
ELSEWHERE = {  # eval/ also holds `tunerun eval`'s and the GGUF checks' records: not the run's own evaluations
    "eval/on-demand/final.json": record(4, "on-demand", {"exact_match": 0.1}, []),
    "eval/exports/final-gguf-q8_0.json": {"prompts": 100, "exact_match_gguf": 0.2},
}


# ── evaluation ──────────────────────────────────────────────────────────────────────────────────────────────

def test_evaluation_is_base_vs_tuned_every_step_the_gates_and_examples_side_by_side(tmp_path):
    judged_again = {**GATES, "passed": False}  # run.json holds the verdict of record (a re-judged run)
    run = make_run(tmp_path, {"eval/base.json": BASE, "eval/step-000002.json": STEP_2,
                              "eval/step-000004.json": FINAL, **ELSEWHERE}, gates=judged_again)
    found = evaluation(run, JOB_ID)
    assert found["object"] == "fine_tuning.job.evaluation" and found["fine_tuning_job_id"] == JOB_ID
    assert found["metric_names"] == ["loss", "perplexity", "exact_match", "f1", "rouge_l", "label_accuracy",
                                     "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                                     "forgetting_drop"]
    assert found["generation_metrics"] == ["exact_match", "f1", "rouge_l"]
    # unmeasured metrics (None) are left out
    assert found["base"] == {"step": 0, "metrics": {"loss": 2.5, "perplexity": 12.18, "exact_match": 0.0}}
    assert found["tuned"] == {"step": 4, "metrics": {"loss": 0.25, "exact_match": 0.9, "forgetting_drop": 0.01}}
    assert found["steps"] == [{"step": 2, "metrics": {"loss": 1.25, "exact_match": 0.5}}, found["tuned"]]
    assert found["gates"] == judged_again
    assert found["general"] == {"base": {"rouge_l": 0.31}, "tuned": {"rouge_l": 0.3}}
    # the first five held-out examples either model answered: the base's and the final model's answers
    assert found["examples"] == [
        {"index": 0, "prompt": "ticket 0:", "reference": "category: c0", "base_output": "base says 0",
         "tuned_output": None},
        {"index": 1, "prompt": "ticket 1:", "reference": "category: c1", "base_output": None,
         "tuned_output": "tuned says 1"},
        {"index": 2, "prompt": "ticket 2:", "reference": "category: c2", "base_output": "base says 2",
         "tuned_output": "tuned says 2"},
        {"index": 3, "prompt": "ticket 3:", "reference": "category: c3", "base_output": "base says 3",
         "tuned_output": "tuned says 3"},
        {"index": 4, "prompt": "ticket 4:", "reference": "category: c4", "base_output": None,
         "tuned_output": "tuned says 4"},
    ]


def test_a_run_still_training_shows_its_newest_evaluation_and_no_verdict(tmp_path):
    later = record(6, "train", {"loss": 0.75}, [example(1, "step 6 says 1")])
    run = make_run(tmp_path, {"eval/base.json": BASE, "eval/step-000002.json": STEP_2,
                              "eval/step-000006.json": later}, state="running")
    found = evaluation(run, JOB_ID)
    assert found["tuned"] == {"step": 6, "metrics": {"loss": 0.75}}
    assert [s["step"] for s in found["steps"]] == [2, 6]
    assert found["gates"] is None and found["general"] == {"base": {"rouge_l": 0.31}, "tuned": None}
    assert [(e["index"], e["tuned_output"]) for e in found["examples"]][:2] == [(0, None), (1, "step 6 says 1")]


def test_the_gates_come_from_the_final_record_when_run_json_has_none(tmp_path):
    run = make_run(tmp_path, {"eval/base.json": BASE, "eval/step-000004.json": FINAL})
    assert evaluation(run, JOB_ID)["gates"] == GATES


def test_a_run_not_yet_evaluated_has_an_empty_evaluation(tmp_path):
    found = evaluation(make_run(tmp_path, state="running"), JOB_ID)
    assert (found["base"], found["tuned"], found["steps"], found["gates"], found["examples"]) == (None, None, [],
                                                                                                 None, [])
    assert found["general"] == {"base": None, "tuned": None}


# ── data report ─────────────────────────────────────────────────────────────────────────────────────────────

REPORT = {"records_read": 1100, "malformed": 2, "empty": 1, "duplicates": 5, "near_duplicates": 3,
          "fuzzy_duplicates": 0, "too_long_dropped": 4, "train_records": 977, "eval_records": 108,
          "pii": {"email": 12, "phone": 3},
          "files": ["/srv/tunerun/_service/files/acme/file-abc123.jsonl"]}


def test_the_data_report_counts_what_each_cleaning_step_removed_and_names_files_by_id(tmp_path):
    found = data_report(make_run(tmp_path, {"data/data_report.json": REPORT}), JOB_ID)
    assert found["object"] == "fine_tuning.job.data_report" and found["fine_tuning_job_id"] == JOB_ID
    assert found["removed"] == [{"step": "malformed", "records": 2}, {"step": "empty", "records": 1},
                                {"step": "duplicates", "records": 5}, {"step": "near-duplicates", "records": 3},
                                {"step": "fuzzy duplicates", "records": 0}, {"step": "too long", "records": 4}]
    assert found["files"] == ["file-abc123.jsonl"]  # not the server's path
    assert (found["records_read"], found["train_records"], found["pii"]) == (1100, 977, {"email": 12, "phone": 3})


def test_no_data_report_before_the_data_is_prepared_is_404_not_ready(tmp_path):
    with pytest.raises(ApiError) as refused:
        data_report(make_run(tmp_path, state="running"), JOB_ID)
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "not_ready",
                                                                               "fine_tuning_job_id")
    assert JOB_ID in refused.value.message


# ── artifacts ───────────────────────────────────────────────────────────────────────────────────────────────

WEIGHTS = {
    "final/adapter/adapter_model.safetensors": b"a" * 100, "final/adapter/adapter_config.json": b"{}",
    "exports/final-gguf-q8_0/quickstart-q8_0.gguf": b"g" * 50, "exports/final-gguf-q8_0/Modelfile": b"FROM x",
    "exports/step-000002-merged/model.safetensors": b"m" * 300,
    "exports/step-000002-merged/tokenizer/tokenizer.model": b"t" * 7,  # files in subfolders count too
}


def test_artifacts_are_the_final_weights_and_every_export_with_their_size(tmp_path):
    run = make_run(tmp_path, WEIGHTS)
    run.local_path("exports/final-adapter").mkdir(parents=True)  # an export that wrote nothing: not offered
    url = f"/v1/fine_tuning/jobs/{JOB_ID}/artifacts"
    assert artifacts(run, JOB_ID) == [
        {"object": "fine_tuning.job.artifact", "id": "final-adapter", "kind": "adapter", "path": "final/adapter",
         "files": 2, "bytes": 102, "download_url": f"{url}/final-adapter"},
        {"object": "fine_tuning.job.artifact", "id": "exports-final-gguf-q8_0", "kind": "gguf",
         "path": "exports/final-gguf-q8_0", "files": 2, "bytes": 56, "download_url": f"{url}/exports-final-gguf-q8_0"},
        {"object": "fine_tuning.job.artifact", "id": "exports-step-000002-merged", "kind": "merged",
         "path": "exports/step-000002-merged", "files": 2, "bytes": 307,
         "download_url": f"{url}/exports-step-000002-merged"},
    ]
    assert artifact(run, JOB_ID, "exports-final-gguf-q8_0")["bytes"] == 56
    with pytest.raises(ApiError):
        artifact(run, JOB_ID, "final-gguf-q8_0")  # ids are whole


@pytest.mark.parametrize("path, kind", [
    ("final/adapter", "adapter"), ("final/model", "merged"),  # a full fine-tuning run's whole model
    ("exports/final-merged", "merged"), ("exports/step-000002-adapter", "adapter"),
    ("exports/final-gguf-q4_k_m", "gguf"), ("exports/step-000004-model", "merged"),  # `tunerun export` of full FT
])
def test_each_artifact_says_what_kind_of_weights_it_holds(tmp_path, path, kind):
    run = make_run(tmp_path, {f"{path}/weights.bin": b"w"})
    assert [(a["path"], a["kind"]) for a in artifacts(run, JOB_ID)] == [(path, kind)]


def test_a_run_without_weights_has_no_artifacts_and_an_unknown_one_is_404(tmp_path):
    run = make_run(tmp_path, state="running")
    assert artifacts(run, JOB_ID) == []
    with pytest.raises(ApiError) as refused:
        artifact(run, JOB_ID, "final-adapter")
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "not_found", "artifact_id")
