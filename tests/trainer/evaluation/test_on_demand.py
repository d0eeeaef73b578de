"""`tunerun eval RUN` in-process: the method loads the run's weights, the record is the one training builds, judged
against the run's gates, and written to eval/on-demand/."""
from __future__ import annotations

import json

import pytest

from tunerun.jobs.errors import DataError
from tunerun.jobs.loader import load_job_text
from tunerun.trainer.evaluation.on_demand import evaluate_run


def test_final_weights_and_the_checkpoint_holding_them_evaluate_alike(tmp_path, tiny_model_dir, make_run,
                                                                     add_eval_set):
    import torch

    from tunerun.trainer.data.pack import load_examples
    from tunerun.trainer.engines import EvalOnlyEngine
    from tunerun.trainer.evaluation.loss import held_out_loss
    from tunerun.trainer.objectives import objective_for

    run, job, tuned = make_run(tmp_path, tiny_model_dir,
                               job_yaml="eval: {general: null, max_new_tokens: 8, gates: {exact_match: '>= 0.5'}}\n")
    add_eval_set(run)
    final = evaluate_run(run, job, None)
    from_checkpoint = evaluate_run(run, job, 2)  # the same adapter, saved under its live parameter names

    assert (final["source"], final["step"], final["phase"]) == ("final", 2, "on-demand")
    assert run.read_json("eval/on-demand/final.json") == final
    assert run.read_json("eval/on-demand/step-000002.json") == from_checkpoint
    assert final["metrics"] == pytest.approx(from_checkpoint["metrics"])
    assert set(final["metrics"]) == {"loss", "perplexity", "exact_match", "f1", "rouge_l", "generated"}
    assert final["metrics"]["generated"] == 6 and len(final["examples"]) == 6 and "general" not in final
    # The gate is judged like the final eval of training: a random adapter matches no reference.
    assert final["gates"] == {"passed": False, "results": [
        {"metric": "exact_match", "condition": ">= 0.5", "value": final["metrics"]["exact_match"], "passed": False}]}
    # The loss is the tuned model's own on the held-out set.
    eval_set = load_examples(run.local_path("data/eval.jsonl"))
    direct = held_out_loss(EvalOnlyEngine(tuned, torch.device("cpu"), objective_for(job.spec)), eval_set, 0,
                           len(eval_set))
    assert final["metrics"]["loss"] == pytest.approx(direct["loss"], rel=1e-5)


def test_evaluate_run_refuses_a_missing_or_empty_eval_set(tmp_path, tiny_model_dir):
    import yaml

    from tunerun.cluster.run_folder import RunFolder
    from tunerun.jobs.plan import resolve

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    job = resolve(load_job_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{train: {data}}}\n"), run_id="r1")
    run = RunFolder(str(tmp_path / "runs"), "r1")
    run.write_text("job.yaml", yaml.safe_dump(job.model_dump(mode="json")))
    with pytest.raises(DataError, match="data/eval.jsonl is missing"):
        evaluate_run(run, job, None)
    run.write_text("data/eval.jsonl", "")
    with pytest.raises(DataError, match="data/eval.jsonl holds no examples"):
        evaluate_run(run, job, None)
