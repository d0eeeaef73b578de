"""A run folder seen as OpenAI's objects (`tunerun.jobs.service.objects`), with no server and no training.

Each test writes a run folder by hand, as the submitter, the driver and rank 0 leave it (run.json, events.jsonl,
metrics.jsonl with sorted keys, checkpoints/step-NNNNNN/ with their manifest written last), and checks the values
of the job, its events, its checkpoints and its result file. Through the API: tests/jobs/service/test_service_api.py.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.runs import read_info
from tunerun.jobs.service.fine_tuning import ServiceRecord
from tunerun.jobs.service.objects import checkpoints, events, job_object, result_csv, result_file

JOB_ID = "ftjob-0123456789abcdef01234567"
CREATED = 1_700_000_000.75
RECORD = ServiceRecord(job_id=JOB_ID, project="acme", model="support-tiny", created_at=CREATED,
                       request={"model": "support-tiny", "training_file": "file-train", "suffix": "tickets",
                                "metadata": {"ticket": "T-1"}},
                       result_file="file-result", hyperparameters={"n_epochs": 2, "batch_size": 8,
                                                                   "learning_rate_multiplier": 1.0},
                       seed=7)
MODEL = f"ft:support-tiny:acme:tickets:{JOB_ID}"


def lines(rows) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)  # as RunFolder.append_jsonl writes


def make_run(tmp_path: Path, state: str, *, events_=(), metrics=(), **run_json) -> RunFolder:
    """``<tmp>/runs/<JOB_ID>/`` with run.json, events.jsonl and metrics.jsonl, written as plain files."""
    folder = tmp_path / "runs" / JOB_ID
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": JOB_ID, "name": "support", "state": state,
                                                 "target": "local", "created_at": CREATED,
                                                 "updated_at": CREATED + 1, **run_json}))
    (folder / "events.jsonl").write_text(lines(events_))
    (folder / "metrics.jsonl").write_text(lines(metrics))
    return RunFolder(str(tmp_path / "runs"), JOB_ID)


def job_of(run: RunFolder, record: ServiceRecord = RECORD) -> dict:
    return job_object(run, record, read_info(run))


def train(step: int, loss: float, *, elapsed: float | None = None, at: float | None = None, total: int = 10) -> dict:
    return {"time": at if at is not None else CREATED + 100 + step, "step": step, "loss": loss, "lr": 0.001,
            "epoch": 0, "tokens_per_s": 500.0, "tokens_seen": 100 * step, "total_steps": total,
            "elapsed_s": elapsed if elapsed is not None else float(step)}


def evaluated(step: int, *, base: bool = False, at: float | None = None, **metrics) -> dict:
    return {"time": at if at is not None else CREATED + 100 + step + 0.5, "step": step, "base": base,
            **{f"eval_{name}": value for name, value in metrics.items()}}


def event(kind: str, at: float, **fields) -> dict:
    return {"time": at, "event": kind, **fields}


# ── the job ─────────────────────────────────────────────────────────────────────────────────────────────────

def test_a_queued_job_is_its_request_with_nothing_trained_yet(tmp_path):
    run = make_run(tmp_path, "queued", events_=[event("run_queued", CREATED)])
    assert job_of(run) == {
        "object": "fine_tuning.job", "id": JOB_ID, "model": "support-tiny", "created_at": 1_700_000_000,
        "finished_at": None, "status": "queued", "fine_tuned_model": None, "organization_id": "acme",
        "result_files": [], "training_file": "file-train", "validation_file": None,
        "hyperparameters": RECORD.hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": RECORD.hyperparameters}},
        "trained_tokens": None, "error": None, "seed": 7, "estimated_finish": None, "metadata": {"ticket": "T-1"},
        "integrations": [], "user_provided_suffix": "tickets",
        "tunerun": {"run_id": JOB_ID, "state": "queued", "step": None, "total_steps": None, "last_loss": None,
                    "tokens_per_s": None, "last_eval": None, "gates_passed": None},
    }


def test_a_request_without_suffix_or_metadata_shows_none_and_names_its_model_without_suffix(tmp_path):
    bare = dataclasses.replace(RECORD, request={"model": "support-tiny", "training_file": "file-train",
                                                "validation_file": "file-valid",
                                                "integrations": [{"type": "mlflow", "mlflow": {"experiment": "x"}}]})
    run = make_run(tmp_path, "succeeded", metrics=[train(1, 2.0)], finished_at=CREATED + 60)
    job = job_of(run, bare)
    assert job["metadata"] is None and job["user_provided_suffix"] is None
    assert job["validation_file"] == "file-valid"
    assert job["integrations"] == [{"type": "mlflow", "mlflow": {"experiment": "x"}}]
    assert job["fine_tuned_model"] == f"ft:support-tiny:acme::{JOB_ID}"


@pytest.mark.parametrize("state, prepared, status", [
    ("pending", False, "queued"),  # given to the target, not started: OpenAI has no other word for it
    ("running", False, "validating_files"),  # the driver reads, cleans and checks the data
    ("running", True, "running"),
    ("succeeded", True, "succeeded"),
    ("failed", True, "failed"),
    ("cancelled", False, "cancelled"),
    ("preempted", True, "paused"),  # stopped at a checkpoint; resuming continues it
])
def test_the_status_follows_the_run_state(tmp_path, state, prepared, status):
    happened = [event("run_created", CREATED)] + ([event("data_prepared", CREATED + 5)] if prepared else [])
    assert job_of(make_run(tmp_path, state, events_=happened))["status"] == status


def test_a_running_job_estimates_its_finish_from_the_pace_of_this_attempt(tmp_path):
    # 10 s a step before a worker died; the restarted worker group (elapsed_s from 0 again) takes 4 s a step
    rows = [train(1, 3.0, elapsed=10.0), train(2, 2.5, elapsed=20.0), train(3, 2.25, elapsed=30.0),
            train(3, 2.0, elapsed=2.0), train(4, 1.75, elapsed=6.0), train(5, 1.5, elapsed=10.0)]
    run = make_run(tmp_path, "running", events_=[event("data_prepared", CREATED)], metrics=rows,
                   finished_at=CREATED - 1000)  # an earlier launch's end: this one has not ended
    before = time.time()
    job = job_of(run)
    after = time.time()
    assert int(before + 4 * 5) <= job["estimated_finish"] <= int(after + 4 * 5)  # 5 steps left at 4 s
    assert job["status"] == "running" and job["finished_at"] is None and job["trained_tokens"] is None
    assert job["fine_tuned_model"] is None and job["result_files"] == ["file-result"]
    assert job["tunerun"] == {"run_id": JOB_ID, "state": "running", "step": 5, "total_steps": 10, "last_loss": 1.5,
                              "tokens_per_s": 500.0, "last_eval": None, "gates_passed": None}


@pytest.mark.parametrize("rows", [[], [train(1, 3.0)], [train(1, 3.0, elapsed=9.0), train(1, 3.0, elapsed=9.5)]])
def test_no_finish_is_estimated_without_two_different_steps_in_this_attempt(tmp_path, rows):
    run = make_run(tmp_path, "running", events_=[event("data_prepared", CREATED)], metrics=rows)
    assert job_of(run)["estimated_finish"] is None


def test_a_succeeded_job_names_its_model_its_tokens_and_its_last_evaluation(tmp_path):
    rows = [evaluated(0, base=True, loss=2.5, exact_match=0.0), train(1, 2.0, total=4), train(2, 1.5, total=4),
            evaluated(2, loss=1.25, exact_match=0.5), train(3, 1.0, total=4), train(4, 0.5, total=4),
            evaluated(4, loss=0.25, exact_match=0.9, f1=None) | {"forgetting_drop": 0.01, "general_rouge_l": 0.3}]
    run = make_run(tmp_path, "succeeded", events_=[event("data_prepared", CREATED)], metrics=rows,
                   finished_at=CREATED + 99.9, gates={"passed": True, "results": []})
    job = job_of(run)
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == MODEL
    assert job["finished_at"] == 1_700_000_100 and job["trained_tokens"] == 400
    assert job["result_files"] == ["file-result"] and job["error"] is None and job["estimated_finish"] is None
    # the newest evaluation of the tuned model, not the base model's; unmeasured metrics left out
    assert job["tunerun"]["last_eval"] == {"step": 4, "loss": 0.25, "exact_match": 0.9}
    assert job["tunerun"]["gates_passed"] is True and job["tunerun"]["total_steps"] == 4


def test_the_base_models_evaluation_is_not_the_jobs_own(tmp_path):
    run = make_run(tmp_path, "running", events_=[event("data_prepared", CREATED)],
                   metrics=[evaluated(0, base=True, loss=2.5, exact_match=0.0), train(1, 2.0)])
    assert job_of(run)["tunerun"]["last_eval"] is None


@pytest.mark.parametrize("error_kind, code", [
    ("user", "invalid_training_data"), ("disk_full", "disk_full"), ("driver_gone", "driver_gone"),
    ("internal", "internal_error"), (None, "internal_error"),
])
def test_a_failed_job_says_why_in_the_tenants_words(tmp_path, error_kind, code):
    error = ("line 4 of /srv/tunerun/_service/files/acme/file-1a2b.jsonl is not JSON; "
             "see tunerun logs ftjob-x --storage /srv/tunerun for more")
    run = make_run(tmp_path, "failed", error=error, finished_at=CREATED + 5,
                   **({"error_kind": error_kind} if error_kind else {}))
    job = job_of(run)
    # the server's paths and the admin's commands are not the tenant's to see
    assert job["error"] == {"code": code, "message": "line 4 of …/file-1a2b.jsonl is not JSON", "param": None}
    assert job["status"] == "failed" and job["fine_tuned_model"] is None and job["finished_at"] == 1_700_000_005


def test_a_failed_job_without_a_recorded_error_still_says_it_failed(tmp_path):
    assert job_of(make_run(tmp_path, "failed"))["error"] == {"code": "internal_error", "message": "the run failed",
                                                             "param": None}


# ── events ──────────────────────────────────────────────────────────────────────────────────────────────────

def test_events_are_lifecycle_messages_and_metrics_oldest_first_with_stable_ids(tmp_path):
    happened = [event("run_queued", CREATED + 1, reason="waiting"), event("run_dequeued", CREATED + 2),
                event("data_prepared", CREATED + 3, records_read=1100, train_records=990, eval_records=110),
                event("worker_ready", CREATED + 4, load_started=1.0, model_loaded=2.0),  # not a job event
                event("training_started", CREATED + 6, total_steps=10, world_size=2),
                event("checkpoint_saved", CREATED + 9, step=2),
                event("run_failed", CREATED + 11, error="out of memory; its log: /srv/runs/x/logs/driver.log")]
    rows = [evaluated(0, base=True, at=CREATED + 5, loss=2.5, exact_match=0.0),
            train(1, 2.5, at=CREATED + 7), train(2, 1.75, at=CREATED + 8),
            evaluated(2, at=CREATED + 10, loss=1.25, exact_match=0.5, f1=None, generated=3)]
    run = make_run(tmp_path, "failed", events_=happened, metrics=rows)
    found = events(run)
    assert [(e["id"], e["created_at"], e["type"], e["level"], e["message"]) for e in found] == [
        ("ftevent-e0", 1_700_000_001, "message", "info", "Job queued: waiting for a free slot"),
        ("ftevent-e1", 1_700_000_002, "message", "info", "Job started"),
        ("ftevent-e2", 1_700_000_003, "message", "info",
         "Files validated: 1100 records, 990 for training, 110 held out"),
        ("ftevent-m0", 1_700_000_005, "metrics", "info", "Step 0: base model exact_match=0.0000, loss=2.5000"),
        ("ftevent-e4", 1_700_000_006, "message", "info", "Fine-tuning started: 10 steps on 2 workers"),
        ("ftevent-m1", 1_700_000_007, "metrics", "info", "Step 1/10: training loss=2.5000"),
        ("ftevent-m2", 1_700_000_008, "metrics", "info", "Step 2/10: training loss=1.7500"),
        ("ftevent-e5", 1_700_000_009, "message", "info", "Checkpoint saved at step 2"),
        ("ftevent-m3", 1_700_000_010, "metrics", "info", "Step 2: validation exact_match=0.5000, loss=1.2500"),
        ("ftevent-e6", 1_700_000_011, "message", "error", "The job failed: out of memory"),
    ]
    assert all(e["object"] == "fine_tuning.job.event" for e in found)
    data = {e["id"]: e["data"] for e in found}
    assert data["ftevent-e0"] == {"reason": "waiting"} and data["ftevent-e4"] == {"total_steps": 10, "world_size": 2}
    assert data["ftevent-m1"] == {"step": 1, "train_loss": 2.5, "total_steps": 10, "learning_rate": 0.001,
                                  "tokens_per_s": 500.0}
    assert data["ftevent-m3"] == {"step": 2, "exact_match": 0.5, "generated": 3, "loss": 1.25}  # None left out


def test_events_within_one_second_keep_the_order_they_happened_in(tmp_path):
    """created_at has whole seconds; a run's last eval and its end often share one (CI saw the end listed first)."""
    second = int(CREATED) + 3
    happened = [event("training_started", second - 2, total_steps=2, world_size=2),
                event("run_succeeded", second + 0.9)]
    rows = [train(2, 1.5, at=second + 0.2), evaluated(2, at=second + 0.6, loss=1.25)]
    found = events(make_run(tmp_path, "succeeded", events_=happened, metrics=rows))
    assert [e["message"] for e in found][-2:] == ["Step 2: validation loss=1.2500", "The job has successfully completed"]
    assert [e["created_at"] for e in found][-3:] == [second] * 3


@pytest.mark.parametrize("kind, fields, message", [
    ("run_created", {}, "Job created"),
    ("run_resumed", {}, "Job resumed from its newest checkpoint"),
    ("training_started", {"total_steps": 10, "world_size": 2, "start_step": 4},
     "Fine-tuning started: 10 steps on 2 workers, from step 4"),
    ("checkpoint_and_stop_requested", {}, "Pause requested: stopping at the next checkpoint"),
    ("run_succeeded", {}, "The job has successfully completed"),
    ("run_cancelled", {}, "The job was cancelled"),
    ("run_preempted", {"detail": "the node was drained"}, "The job is paused (the node was drained)"),
    ("run_preempted", {}, "The job is paused (stopped at a checkpoint)"),
    ("resumed", {"step": 6, "checkpoint": "step-000006"}, "Training continues from the checkpoint at step 6"),
])
def test_each_lifecycle_event_reads_as_a_sentence(tmp_path, kind, fields, message):
    run = make_run(tmp_path, "running", events_=[event(kind, CREATED, **fields)])
    assert [(e["message"], e["level"]) for e in events(run)] == [(message, "info")]


def test_a_skipped_damaged_checkpoint_is_a_warning_the_tenant_sees(tmp_path):
    note = "step-000008: weights.safetensors does not match its sha256"
    run = make_run(tmp_path, "running", events_=[event("checkpoint_skipped", CREATED, detail=note)])
    assert [(e["message"], e["level"]) for e in events(run)] == [
        (f"A damaged checkpoint was skipped: {note}", "warn")]


def test_events_appear_as_their_lines_are_completed_and_keep_their_ids(tmp_path):
    run = make_run(tmp_path, "running", events_=[event("run_created", CREATED)])
    path = run.local_path("events.jsonl")
    assert [e["id"] for e in events(run)] == ["ftevent-e0"]
    written = json.dumps(event("data_prepared", CREATED + 2, records_read=10, train_records=9, eval_records=1))
    with path.open("a") as log:
        log.write(written[:20])  # a line still being written by the driver
    assert [e["id"] for e in events(run)] == ["ftevent-e0"]
    with path.open("a") as log:
        log.write(written[20:] + "\n")
        log.write(json.dumps(event("run_succeeded", CREATED + 3)) + "\n")
    found = events(run)
    assert [e["id"] for e in found] == ["ftevent-e0", "ftevent-e1", "ftevent-e2"]
    assert found[1]["message"] == "Files validated: 10 records, 9 for training, 1 held out"
    assert found[2]["message"] == "The job has successfully completed"


# ── checkpoints ─────────────────────────────────────────────────────────────────────────────────────────────

def write_checkpoint(run: RunFolder, step: int, metrics: dict | None, *, manifest: bool = True,
                     name: str | None = None) -> None:
    """checkpoints/step-NNNNNN/ with one weights file; its manifest (written last) makes it complete."""
    folder = run.local_path(f"checkpoints/{name or f'step-{step:06d}'}")
    folder.mkdir(parents=True)
    weights = b"weights of step %d" % step
    (folder / "adapter_model.safetensors").write_bytes(weights)
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "step": step, "metrics": metrics or {},
            "files": [{"path": "adapter_model.safetensors", "size": len(weights),
                       "sha256": hashlib.sha256(weights).hexdigest()}]}))


def test_checkpoints_are_the_complete_ones_newest_first_with_their_metrics(tmp_path):
    run = make_run(tmp_path, "running", metrics=[train(1, 2.0), train(2, 1.5, at=CREATED + 50), train(3, 1.0)])
    write_checkpoint(run, 2, {"loss": 1.25, "exact_match": 0.5, "f1": None, "rouge_l": 0.75})
    write_checkpoint(run, 4, None)  # no train row (yet): created with the job, no training loss
    write_checkpoint(run, 6, {"loss": 0.5}, manifest=False)  # still being saved
    write_checkpoint(run, 8, {"loss": 0.4}, name="tmp-upload")  # not a checkpoint folder
    prefix = f"ftckpt-{JOB_ID.removeprefix('ftjob-')}"
    assert checkpoints(run, RECORD) == [
        {"object": "fine_tuning.job.checkpoint", "id": f"{prefix}-4", "created_at": 1_700_000_000,
         "fine_tuned_model_checkpoint": f"{MODEL}:ckpt-step-4", "step_number": 4,
         "metrics": {"step": 4, "train_loss": None, "valid_loss": None, "full_valid_loss": None},
         "fine_tuning_job_id": JOB_ID},
        {"object": "fine_tuning.job.checkpoint", "id": f"{prefix}-2", "created_at": 1_700_000_050,
         "fine_tuned_model_checkpoint": f"{MODEL}:ckpt-step-2", "step_number": 2,
         "metrics": {"step": 2, "train_loss": 1.5, "valid_loss": 1.25, "full_valid_loss": 1.25, "exact_match": 0.5,
                     "rouge_l": 0.75},
         "fine_tuning_job_id": JOB_ID},
    ]


def test_a_run_without_checkpoints_has_none(tmp_path):
    assert checkpoints(make_run(tmp_path, "running", metrics=[train(1, 2.0)]), RECORD) == []


# ── the result file ─────────────────────────────────────────────────────────────────────────────────────────

def test_the_result_file_is_one_csv_row_per_step_without_the_base_model(tmp_path):
    rows = [evaluated(0, base=True, loss=2.5, exact_match=0.0), train(1, 2.0), train(2, 1.5),
            evaluated(2, loss=1.25, exact_match=0.5, label_accuracy=0.75),
            train(3, 1.25), train(3, 1.0)]  # step 3 again: a restarted worker group repeated it
    run = make_run(tmp_path, "succeeded", metrics=rows, finished_at=CREATED + 60)
    content = result_csv(run)
    table = list(csv.reader(io.StringIO(content.decode("utf-8"))))
    assert table == [
        ["step", "train_loss", "learning_rate", "tokens_per_s", "valid_loss", "exact_match", "f1", "rouge_l",
         "label_accuracy"],
        ["1", "2.0", "0.001", "500.0", "", "", "", "", ""],
        ["2", "1.5", "0.001", "500.0", "1.25", "0.5", "", "", "0.75"],
        ["3", "1.0", "0.001", "500.0", "", "", "", "", ""],
    ]
    assert result_file(run, RECORD) == {
        "object": "file", "id": "file-result", "bytes": len(content), "created_at": 1_700_000_000,
        "filename": f"{JOB_ID}-metrics.csv", "purpose": "fine-tune-results", "status": "processed",
        "status_details": None}


def test_a_dpo_jobs_checkpoints_and_result_file_carry_its_preference_metrics(tmp_path):
    rows = [train(1, 0.9), evaluated(2, loss=0.6, reward_accuracy=0.75, reward_margin=0.4, chosen_logp=-12.0,
                                     rejected_logp=-20.0), train(2, 0.7)]
    run = make_run(tmp_path, "succeeded", metrics=rows, finished_at=CREATED + 60)
    write_checkpoint(run, 2, {"loss": 0.6, "reward_accuracy": 0.75, "reward_margin": 0.4})
    assert checkpoints(run, RECORD)[0]["metrics"] == {"step": 2, "train_loss": 0.7, "valid_loss": 0.6,
                                                      "full_valid_loss": 0.6, "reward_accuracy": 0.75,
                                                      "reward_margin": 0.4}
    table = list(csv.reader(io.StringIO(result_csv(run).decode("utf-8"))))
    assert table[0][-4:] == ["reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"]
    assert table[2][0] == "2" and table[2][-4:] == ["0.75", "0.4", "-12.0", "-20.0"]


def test_a_job_that_has_not_trained_has_an_empty_result_file(tmp_path):
    run = make_run(tmp_path, "queued")
    assert result_csv(run).decode().splitlines() == [
        "step,train_loss,learning_rate,tokens_per_s,valid_loss,exact_match,f1,rouge_l,label_accuracy"]
