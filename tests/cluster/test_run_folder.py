"""The run folder's typed reads: a job.yaml of another tunerun, metrics rows, evaluation records, checkpoints, and
the incremental JSON-lines reader. Run folders are written here by hand, the way a run (or an older tunerun)
leaves them."""
from __future__ import annotations

import json
import logging

import pytest
import yaml

from tunerun.cluster import run_folder as rf
from tunerun.cluster.run_folder import RunFolder
from tunerun.jobs.errors import UnreadableJob
from tunerun.jobs.plan import TUNERUN_VERSION, resolve
from tunerun.jobs.spec import JobSpec


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder(str(tmp_path / "runs"), "r1")


@pytest.fixture
def job(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "intermediate_size": 128}))
    (tmp_path / "train.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    spec = JobSpec.model_validate({"name": "support", "model": {"path": str(model)},
                                   "data": {"train": str(tmp_path / "train.jsonl")}})
    return resolve(spec, run_id="r1")


def rewrite_job(run: RunFolder, change) -> None:
    data = yaml.safe_load(run.read_text(rf.JOB))
    change(data)
    run.write_text(rf.JOB, yaml.safe_dump(data))


def test_a_job_reads_back_as_it_was_written(run, job):
    rf.write_job(run, job)
    assert rf.read_job(run) == job and rf.read_job(run, to_run=True) == job


def test_a_key_this_tunerun_does_not_know_is_named_and_left_out_when_shown(run, job, caplog):
    rf.write_job(run, job)
    rewrite_job(run, lambda d: d["spec"]["training"].update(objective_weights=[1, 2]))
    with caplog.at_level(logging.WARNING, logger="tunerun"):
        assert rf.read_job(run) == job
    assert "spec.training.objective_weights" in caplog.text


def test_a_job_to_run_with_an_unknown_key_is_refused_naming_the_key_and_the_writer(run, job):
    rf.write_job(run, job)
    rewrite_job(run, lambda d: d.update(tunerun_version="9.1.0", sharding={"stages": 2}))
    with pytest.raises(UnreadableJob, match=rf"job\.yaml was written by tunerun 9\.1\.0 and this server runs tunerun "
                                            rf"{TUNERUN_VERSION}, which cannot read it \(sharding: Extra inputs"):
        rf.read_job(run, to_run=True)


def test_a_damaged_job_is_unreadable_whatever_the_use(run, job):
    rf.write_job(run, job)
    rewrite_job(run, lambda d: d["spec"]["training"].update(learning_rate="fast"))
    with pytest.raises(UnreadableJob, match=r"cannot be read as a job \(spec\.training\.learning_rate: "):
        rf.read_job(run)
    run.write_text(rf.JOB, "spec: [unclosed\n")
    with pytest.raises(UnreadableJob, match="cannot be read as a job"):
        rf.read_job(run)


def test_metrics_rows_are_train_or_eval_by_one_rule(run):
    for row in ({"step": 0, "time": 1.0, "base": True, "eval_loss": 3.0, "eval_exact_match": None},
                {"step": 1, "time": 2.0, "loss": 2.5, "lr": 1e-3, "new_counter": 7},
                {"step": 1, "time": 3.0, "eval_loss": 2.0, "eval_f1": 0.5, "general_rouge_l": 0.3},
                {"time": 4.0, "note": "not a row"}):
        rf.append_metrics(run, row)
    rows = rf.metric_rows(run)
    assert [type(r).__name__ for r in rows.ordered] == ["EvalRow", "TrainRow", "EvalRow"]
    assert rows.last_train.loss == 2.5 and rows.last_train.model_extra == {"new_counter": 7}
    assert [r.step for r in rows.tuned_evals()] == [1]
    assert rows.evals[0].held_out == {"loss": 3.0} and rows.evals[1].held_out == {"loss": 2.0, "f1": 0.5}


def test_an_eval_row_is_the_flat_form_of_its_record():
    record = {"step": 4, "time": 9.0, "base": False, "metrics": {"loss": 1.5, "forgetting_drop": 0.1},
              "general": {"rouge_l": 0.4}}
    row = rf.EvalRow.from_record(record)
    assert row.model_dump() == {"step": 4, "time": 9.0, "base": False, "eval_loss": 1.5, "forgetting_drop": 0.1,
                                "general_rouge_l": 0.4}


def test_the_final_evaluation_is_the_final_phase_else_the_newest_step(run):
    run.write_json(rf.EVAL_BASE, {"step": 0, "phase": "base", "metrics": {}})
    run.write_json(rf.eval_record_name(10, "train"), {"step": 10, "phase": "train", "metrics": {}})
    run.write_json(rf.eval_record_name(5, "train"), {"step": 5, "phase": "train", "metrics": {}})
    assert (rf.eval_records(run).base["step"], rf.eval_records(run).final["step"]) == (0, 10)
    run.write_json(rf.eval_record_name(20, "final"), {"step": 20, "phase": "final", "metrics": {}})
    run.write_json(rf.on_demand_record_name("checkpoints/step-000005"), {"step": 5})
    records = rf.eval_records(run)
    assert [r["step"] for r in records.steps] == [5, 10, 20] and records.final["step"] == 20
    assert records.on_demand == [{"step": 5}] and records.export_checks == []


def test_checkpoints_are_complete_once_their_manifest_is_written_and_verify_against_it(run, tmp_path):
    for step in (2, 4):
        folder = rf.checkpoint_name(step)
        run.write_text(f"{folder}/weights.bin", "w" * step)
    run.write_text(f"{rf.CHECKPOINTS}/step-notanumber/x", "ignored")
    digests = {"weights.bin": {"size": 2, "sha256": rf.sha256_of(run.local_path(rf.checkpoint_name(2)) / "weights.bin")}}
    rf.write_manifest(run, rf.checkpoint_name(2), 2, digests, {"loss": 1.0})
    assert rf.checkpoint_folders(run) == ["step-000002", "step-000004"]
    assert rf.complete_checkpoints(run) == ["step-000002"]
    assert rf.last_complete_checkpoint(run) == "checkpoints/step-000002"
    assert rf.stored_manifest(run, "step-000004") == (None, "no manifest (incomplete save)")
    assert rf.verify(run.local_path(rf.checkpoint_name(2))) is None
    run.write_text(f"{rf.checkpoint_name(2)}/weights.bin", "xx")  # same size, other bytes
    assert rf.verify(run.local_path(rf.checkpoint_name(2))) == "weights.bin does not match its sha256"


def test_the_tail_parses_only_completed_lines_and_starts_again_after_a_rewrite(run):
    tail = rf.JsonlTail()
    run.append_jsonl(rf.EVENTS, {"event": "a"})
    path = run.local_path(rf.EVENTS)
    with path.open("a") as handle:
        handle.write('{"event": "b"')  # a line still being written
    assert [e["event"] for e in rf.events(run, tail)] == ["a"]
    with path.open("a") as handle:
        handle.write("}\n")
    assert [e["event"] for e in rf.events(run, tail)] == ["a", "b"]
    path.write_text('{"event": "c"}\n')  # rewritten, shorter
    assert [e["event"] for e in rf.events(run, tail)] == ["c"]


def test_the_tail_types_each_metrics_line_once(run, monkeypatch):
    calls, typed = [], rf.row_of
    counted = lambda raw: calls.append(raw["step"]) or typed(raw)  # noqa: E731
    monkeypatch.setattr(rf, "row_of", counted)
    tail = rf.JsonlTail()
    for step in (1, 2):
        rf.append_metrics(run, {"step": step, "time": 1.0, "loss": 2.0})
    assert [r.step for r in rf.metric_rows(run, tail).train] == [1, 2]
    rf.append_metrics(run, {"step": 3, "time": 2.0, "eval_loss": 1.5})
    rows = rf.metric_rows(run, tail)
    assert ([r.step for r in rows.train], [r.step for r in rows.evals]) == ([1, 2], [3])
    assert calls == [1, 2, 3]
