"""Preference tuning through the service: OpenAI's ``method: {"type": "dpo"}`` with the official `openai` client,
against the app in this process (no training: jobs stay ``queued``; the spec a job would run is its job.yaml).

The preference file is examples/make_preference_data.py's (OpenAI's DPO JSONL), the chat file the support tickets.
DPO training itself is tests/trainer/test_dpo.py and tests/e2e/test_preference.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import yaml
from service_calls import TICKETS, client, upload, write_lines

from tunerun.cluster import targets
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.service.config import UPLOAD_PLACEHOLDER

MODEL = "support-tiny"


@pytest.fixture
def pairs(app, keys, tmp_path, example_module):
    """A processed upload of 20 preference pairs in OpenAI's format."""
    path = example_module("make_preference_data").make_preference_data(tmp_path / "prefs.jsonl", n=20)
    return upload(app, keys["acme"], "acme", path)


@pytest.fixture
def tickets(app, keys):
    return upload(app, keys["acme"], "acme", TICKETS)


def spec_of(job) -> dict:
    """The job spec the job's run would train with (the run folder's job.yaml)."""
    return yaml.safe_load((Path("runs") / job.id / "job.yaml").read_text())["spec"]


def retemplate(served, old: str, new: str) -> None:
    """The catalog model's job spec with ``old`` replaced by ``new``, as if the admin had written it so."""
    text = served.texts[MODEL].replace(old, new)
    assert text != served.texts[MODEL]
    served.texts[MODEL] = text
    served.templates[MODEL] = load_job_text(text, "support.yaml", [f"data.train={UPLOAD_PLACEHOLDER}"],
                                            model=targets.job_model())


def refusal(app, keys, **arguments) -> dict:
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).fine_tuning.jobs.create(model=MODEL, **arguments)
    assert not list(Path("runs").glob("ftjob-*"))  # nothing half-written
    return refused.value.body


# ── accepted ────────────────────────────────────────────────────────────────────────────────────────────────

def test_a_dpo_job_runs_the_template_with_objective_dpo_and_shows_its_method(app, keys, pairs):
    assert pairs.status == "processed" and pairs.model_extra["tunerun"]["format"] == "openai_preference"
    assert pairs.model_extra["tunerun"]["preference_pairs"] is True  # what the dashboard chooses the method by
    acme = client(app, keys["acme"])
    job = acme.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id,
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.status == "queued" and job.method.type == "dpo" and job.method.supervised is None
    shown = job.method.dpo.hyperparameters
    assert (shown.beta, shown.batch_size, shown.n_epochs) == (0.2, 8, 1)  # beta sent, the rest the template's
    assert shown.learning_rate_multiplier == pytest.approx(1.0)
    training = spec_of(job)["training"]
    assert training["objective"] == "dpo" and training["dpo"] == {"beta": 0.2, "nll_weight": 1.0}
    # retrieve and list read the same object back from the run folder
    assert acme.fine_tuning.jobs.retrieve(job.id).method.model_dump() == job.method.model_dump()
    assert [j.method.type for j in acme.fine_tuning.jobs.list().data] == ["dpo"]


def test_auto_beta_keeps_the_default_and_the_other_hyperparameters_map_as_for_supervised(app, keys, pairs):
    job = client(app, keys["acme"]).fine_tuning.jobs.create(
        model=MODEL, training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": "auto", "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
    shown = job.method.dpo.hyperparameters
    assert (shown.beta, shown.n_epochs, shown.batch_size) == (0.1, 2, 4)
    training = spec_of(job)["training"]
    assert training["dpo"]["beta"] == 0.1 and training["epochs"] == 2 and training["global_batch_size"] == 4
    assert training["learning_rate"] == pytest.approx(5.0e-4)  # 0.5 × the template's 1e-3
    bare = client(app, keys["acme"]).fine_tuning.jobs.create(model=MODEL, training_file=pairs.id,
                                                             method={"type": "dpo"})
    assert bare.method.dpo.hyperparameters.beta == 0.1 and spec_of(bare)["training"]["objective"] == "dpo"


def test_a_supervised_job_keeps_its_shape_and_objective(app, keys, tickets):
    assert tickets.model_extra["tunerun"]["format"] == "chat"
    assert tickets.model_extra["tunerun"]["preference_pairs"] is False
    job = client(app, keys["acme"]).fine_tuning.jobs.create(
        model=MODEL, training_file=tickets.id, method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2}}})
    assert job.method.type == "supervised" and job.method.dpo is None
    assert job.method.supervised.hyperparameters.n_epochs == 2 == job.hyperparameters.n_epochs
    training = spec_of(job)["training"]
    assert training["objective"] == "sft" and training.get("dpo") is None


def test_a_packing_template_trains_dpo_unpacked_and_a_dpo_template_gives_its_beta(app, keys, served, pairs,
                                                                                      tickets):
    retemplate(served, "data: {eval_fraction: 0.1,", "data: {packing: true, eval_fraction: 0.1,")
    acme = client(app, keys["acme"])
    job = acme.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id, method={"type": "dpo"})
    assert spec_of(job)["data"]["packing"] is False
    supervised = acme.fine_tuning.jobs.create(model=MODEL, training_file=tickets.id)
    assert spec_of(supervised)["data"]["packing"] is True  # supervised jobs pack as the admin chose
    # An admin's DPO model: "auto" keeps its beta, and a supervised request still trains sft on it.
    retemplate(served, "packing: true, ", "")
    retemplate(served, "training: {", "training: {objective: dpo, dpo: {beta: 0.3}, ")
    job = acme.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id, method={"type": "dpo"})
    assert job.method.dpo.hyperparameters.beta == 0.3 and spec_of(job)["training"]["dpo"]["beta"] == 0.3
    supervised = acme.fine_tuning.jobs.create(model=MODEL, training_file=tickets.id)
    assert supervised.method.type == "supervised" and spec_of(supervised)["training"]["objective"] == "sft"


def test_a_file_object_stored_before_formats_were_recorded_still_loads_and_trains(app, keys, pairs):
    stored = Path("runs") / "_service" / "files" / "acme" / f"{pairs.id}.json"
    old = {k: v for k, v in json.loads(stored.read_text()).items() if k != "format"}
    stored.write_text(json.dumps(old))
    acme = client(app, keys["acme"])
    assert acme.files.retrieve(pairs.id).model_extra["tunerun"]["format"] is None
    # nothing to compare at creation: the run's data preparation refuses a mismatch by name
    assert acme.fine_tuning.jobs.create(model=MODEL, training_file=pairs.id, method={"type": "dpo"}).status == "queued"


# ── refused ─────────────────────────────────────────────────────────────────────────────────────────────────

def test_the_files_must_hold_the_records_the_method_trains_on(app, keys, pairs, tickets):
    body = refusal(app, keys, training_file=pairs.id)
    assert body["param"] == "training_file" and body["code"] == "invalid_file"
    assert "openai_preference records (preference pairs)" in body["message"] and '"dpo"' in body["message"]
    assert "method supervised trains on chat, sharegpt, alpaca, text" in body["message"]
    body = refusal(app, keys, training_file=tickets.id, method={"type": "dpo"})
    assert body["param"] == "training_file"
    assert "holds chat records; method dpo trains on openai_preference, trl_preference" in body["message"]
    assert '"preferred_output"' in body["message"]  # OpenAI's shape, to fix the file by
    body = refusal(app, keys, training_file=pairs.id, validation_file=tickets.id, method={"type": "dpo"})
    assert body["param"] == "validation_file" and "holds chat records" in body["message"]


def test_a_file_mixing_formats_fails_validation(app, keys, tmp_path, example_module):
    made = example_module("make_preference_data").make_preference_data(tmp_path / "p.jsonl", n=20)
    mixed = made.read_text().splitlines()[:5] + TICKETS.read_text().splitlines()[:1]
    found = upload(app, keys["acme"], "acme", write_lines(tmp_path / "mixed.jsonl", mixed))
    assert found.status == "error" and found.model_extra["tunerun"]["format"] is None
    assert "line 6: this record is chat but the first one (line 1) is openai_preference" in found.status_details


@pytest.mark.parametrize("method, param, fragment", [
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta", "above 0"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "method.dpo.hyperparameters.beta",
     "'auto' or a number"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": True}}}, "method.dpo.hyperparameters.beta",
     "'auto' or a number"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 20}}}, "method.dpo.hyperparameters.beta", "10"),  # spec's
    ({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1.5}}}, "method.dpo.hyperparameters.n_epochs",
     "whole number"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 64}}}, "method.dpo.hyperparameters.batch_size",
     "training examples"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 51}}}, "method.dpo.hyperparameters.n_epochs",
     "at most 50"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}, "method.dpo.hyperparameters.gamma",
     "unknown parameter"),
    ({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}, "method.supervised",
     "its settings go under method.dpo"),
    ({"type": "reinforcement", "reinforcement": {"grader": {}}}, "method.type",
     "'reinforcement' is not available here; tunerun fine-tunes with 'supervised' or 'dpo'"),
])
def test_bad_dpo_requests_are_400_naming_the_parameter(app, keys, pairs, method, param, fragment):
    body = refusal(app, keys, training_file=pairs.id, method=method)
    assert body["param"] == param and fragment in body["message"], body
    if method["type"] == "reinforcement":
        assert body["code"] == "unsupported_method"


def test_top_level_hyperparameters_with_dpo_are_400(app, keys, pairs):
    body = refusal(app, keys, training_file=pairs.id, hyperparameters={"n_epochs": 2}, method={"type": "dpo"})
    assert body["param"] == "hyperparameters" and "method.dpo.hyperparameters" in body["message"]


def test_a_full_fine_tune_model_trains_dpo_too(app, keys, served, pairs):
    retemplate(served, "method: {kind: lora}", "method: {kind: full}")
    job = client(app, keys["acme"]).fine_tuning.jobs.create(model=MODEL, training_file=pairs.id,
                                                             method={"type": "dpo"})
    spec = spec_of(job)
    assert job.method.type == "dpo" and spec["training"]["objective"] == "dpo" and spec["method"]["kind"] == "full"


# ── starting from a fine-tuned model (OpenAI's supervised-then-dpo flow) ────────────────────────────────────


def succeed_with_adapter(job_id: str, served) -> None:
    """What the trainer leaves when the job succeeds: run.json and a PEFT adapter (rank 8) in final/adapter."""
    from tunerun.cluster.run_folder import ADAPTER_CONFIG, RunFolder, final_weights
    from tunerun.cluster.runs import RunState, record_outcome

    run = RunFolder(served.config.storage, job_id)
    run.write_text(f"{final_weights('adapter')}/{ADAPTER_CONFIG}", json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    record_outcome(run, RunState.SUCCEEDED)


def test_dpo_on_a_fine_tuned_model_starts_from_its_adapter_and_other_projects_cannot(app, keys, served, pairs,
                                                                                   tickets):
    acme = client(app, keys["acme"])
    sft = acme.fine_tuning.jobs.create(model=MODEL, training_file=tickets.id, suffix="tickets")
    name = f"ft:{MODEL}:acme:tickets:{sft.id}"
    with pytest.raises(openai.BadRequestError) as refused:  # still queued: nothing to start from yet
        acme.fine_tuning.jobs.create(model=name, training_file=pairs.id, method={"type": "dpo"})
    assert refused.value.body["code"] == "model_not_ready" and refused.value.body["param"] == "model"
    succeed_with_adapter(sft.id, served)
    assert acme.fine_tuning.jobs.retrieve(sft.id).fine_tuned_model == name
    dpo = acme.fine_tuning.jobs.create(model=name, training_file=pairs.id, method={"type": "dpo"})
    assert dpo.model == name and dpo.method.type == "dpo"  # as OpenAI shows a job started from a fine-tune
    spec = spec_of(dpo)
    assert spec["model"]["adapter"] == str((Path("runs") / sft.id / "final" / "adapter").absolute())
    assert spec["method"]["lora"]["r"] == 8 and spec["training"]["objective"] == "dpo"
    # another project's key cannot start from acme's model, exactly as if it did not exist
    with pytest.raises(openai.NotFoundError) as hidden:
        client(app, keys["other"]).fine_tuning.jobs.create(model=name, training_file=pairs.id,
                                                           method={"type": "dpo"})
    assert hidden.value.body["code"] == "model_not_found"


def test_a_lora_trained_on_a_full_fine_tune_is_continued_on_that_fine_tunes_weights(app, keys, served, pairs,
                                                                                      tickets):
    """Full fine-tune → LoRA on it → DPO on that LoRA: the adapter is continued on the weights it was trained on
    (the full fine-tune's final/model), not on the catalog model's (where it would mean something else)."""
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.cluster.runs import RunState, record_outcome

    acme = client(app, keys["acme"])
    retemplate(served, "method: {kind: lora}", "method: {kind: full}")
    full = acme.fine_tuning.jobs.create(model=MODEL, training_file=tickets.id, suffix="full")
    shutil.copytree(served.templates[MODEL].model.path, Path("runs") / full.id / "final" / "model")
    record_outcome(RunFolder(served.config.storage, full.id), RunState.SUCCEEDED)
    retemplate(served, "method: {kind: full}", "method: {kind: lora}")
    lora = acme.fine_tuning.jobs.create(model=f"ft:{MODEL}:acme:full:{full.id}", training_file=tickets.id,
                                        suffix="lora")
    full_weights = str((Path("runs") / full.id / "final" / "model").absolute())
    assert spec_of(lora)["model"]["path"] == full_weights and spec_of(lora)["model"].get("adapter") is None
    succeed_with_adapter(lora.id, served)
    dpo = acme.fine_tuning.jobs.create(model=f"ft:{MODEL}:acme:lora:{lora.id}", training_file=pairs.id,
                                       method={"type": "dpo"})
    assert spec_of(dpo)["model"]["path"] == full_weights
    assert spec_of(dpo)["model"]["adapter"] == str((Path("runs") / lora.id / "final" / "adapter").absolute())
