"""The MLflow tracker against a real `mlflow server`: params within MLflow's limits, and an outage that costs
training nothing — a warning, retries with backoff, everything delivered once the server is back."""
from __future__ import annotations

import json

from tunerun.jobs.spec import MlflowSpec
from tunerun.trainer.tracking import MAX_PARAM_VALUE, PARAMS_PER_BATCH, MlflowTracker, flatten_params, numeric_metrics


def test_flatten_params_dots_nested_keys_and_fits_mlflow_limits():
    flat = flatten_params({"training": {"learning_rate": 2e-4, "max_steps": None},
                           "eval": {"metrics": ["loss", "f1"], "gates": {}}, "note": "x" * 7000})
    assert flat["training.learning_rate"] == "0.0002" and flat["training.max_steps"] == "None"
    assert json.loads(flat["eval.metrics"]) == ["loss", "f1"] and flat["eval.gates"] == "{}"
    assert len(flat["note"]) == MAX_PARAM_VALUE


def test_numeric_metrics_keeps_curves_not_flags_or_counters():
    row = {"time": 1.0, "step": 3, "loss": 0.5, "total_steps": 6, "base": True, "forgetting_flagged": False,
           "eval_exact_match": 1}
    assert numeric_metrics(row) == {"loss": 0.5, "eval_exact_match": 1.0}


def _new_run(server) -> str:
    client = server.client()
    experiment = client.create_experiment(f"unit-{server.port}-{id(client)}")
    return client.create_run(experiment).info.run_id


def test_resolved_job_params_arrive_in_batches_mlflow_accepts(mlflow_server):
    run_id = _new_run(mlflow_server)
    params = {f"p.{i:03d}": str(i) for i in range(PARAMS_PER_BATCH * 2 + 5)}
    tracker = MlflowTracker(MlflowSpec(tracking_uri=mlflow_server.uri), run_id)
    tracker.log_params(params)
    assert tracker.close()
    assert mlflow_server.client().get_run(run_id).data.params == params


def test_server_down_warns_retries_and_delivers_once_it_is_back(mlflow_server):
    run_id = _new_run(mlflow_server)
    warnings: list[str] = []
    tracker = MlflowTracker(MlflowSpec(tracking_uri=mlflow_server.uri), run_id, warn=warnings.append)
    mlflow_server.stop()
    try:
        for step in range(1, 6):  # returns at once: training is never held up by the server
            tracker.log_metrics(step, {"loss": 1.0 / step})
        assert not tracker.close(wait_s=0.5)  # nothing could be sent yet
        assert "did not take" in warnings[0] and "retrying with backoff" in warnings[0]
        assert "not sent" in warnings[-1] and "metrics.jsonl" in warnings[-1]
    finally:
        mlflow_server.start()
    assert tracker.close(wait_s=120)  # the same sender, retrying: it reaches the restarted server
    assert any("reachable again" in w for w in warnings)
    history = mlflow_server.client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
