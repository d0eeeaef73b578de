"""Hostile and careless requests answered at a bounded cost: no body read without a key, every body bounded
(declared or chunked), hyperparameters the catalog and the data cannot run refused with the field named."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
import yaml
from fastapi.testclient import TestClient
from service_calls import TICKETS, client, upload

from tunerun.jobs.service.config import JobLimits

CHUNK = 1 << 20


def call(app, method: str, path: str, headers: dict[str, str], chunks: int, chunk: bytes = b"x" * CHUNK):
    """Send a body of ``chunks`` chunks straight into the ASGI app: (status, body, chunks the app pulled)."""
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled >= chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body) if body.startswith(b"{") else body, pulled


def test_a_body_without_a_key_is_never_read(app):
    # FastAPI parses a JSON body before a route's dependencies run: without the gate, 200 chunks were read
    status, body, pulled = call(app, "POST", "/v1/fine_tuning/jobs", {"content-type": "application/json"}, 200)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert pulled == 0
    status, _, pulled = call(app, "POST", "/v1/files", {"authorization": "Bearer tr-000000000000-" + "x" * 43}, 200)
    assert (status, pulled) == (401, 0)


def test_a_declared_oversized_body_is_413_before_a_byte_is_read(app, keys):
    headers = {"authorization": f"Bearer {keys['acme']}", "content-type": "application/json",
               "content-length": str(200 << 20)}
    status, body, pulled = call(app, "POST", "/v1/fine_tuning/jobs", headers, 200)
    assert (status, pulled) == (413, 0)
    assert body["error"]["code"] == "request_too_large" and "65,536 bytes" in body["error"]["message"]


def test_a_chunked_oversized_body_is_refused_once_it_passes_the_limit(app, keys):
    headers = {"authorization": f"Bearer {keys['acme']}", "content-type": "application/json"}
    status, body, pulled = call(app, "POST", "/v1/fine_tuning/jobs", headers, 200, b"[" * 8192)
    assert status == 413 and pulled == 9  # 64 KiB is 8 chunks of 8 KiB: the 9th passes it


def test_a_chunked_upload_is_counted_as_it_streams(app, keys, tmp_path):
    # Without a Content-Length the multipart parser used to spool the whole body to $TMPDIR before the check
    boundary = "tunerun-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    line = b'{"prompt": "a", "completion": "b"}\n'
    headers = {"authorization": f"Bearer {keys['acme']}", "content-type": f"multipart/form-data; boundary={boundary}"}
    status, body, pulled = call(app, "POST", "/v1/files", headers, 400, head + line * (CHUNK // len(line)))
    assert status == 413 and body["error"]["param"] == "file" and "200,000 bytes" in body["error"]["message"]
    assert pulled == 1  # the limit is 200 kB (+ 64 KiB for the form around it): the first 1 MiB chunk passes it
    assert not list((tmp_path / "runs" / "_service" / "files").glob("*/*.jsonl"))


@pytest.mark.parametrize("hyperparameters, param, fragment", [
    ({"n_epochs": True}, "hyperparameters.n_epochs", "number above 0"),
    ({"n_epochs": 1e9}, "hyperparameters.n_epochs", "at most 50 on this server"),
    ({"n_epochs": 2**63}, "hyperparameters.n_epochs", "at most 50 on this server"),
    ({"batch_size": 1_000_000_000}, "hyperparameters.batch_size", "training examples of"),
    ({"batch_size": False}, "hyperparameters.batch_size", "number above 0"),
    ({"learning_rate_multiplier": 5000}, "hyperparameters.learning_rate_multiplier", "(got 5000)"),
])
def test_hyperparameters_the_catalog_and_the_data_cannot_run_are_400(app, keys, hyperparameters, param, fragment):
    found = upload(app, keys["acme"], "acme", TICKETS)
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id,
                                                         hyperparameters=hyperparameters)
    assert refused.value.body["param"] == param and fragment in refused.value.body["message"], refused.value.body
    assert "learning rate of" not in refused.value.body["message"]  # the multiplier sent, not the derived rate


def test_a_job_over_the_servers_step_budget_is_refused(app, keys, monkeypatch):
    jobs = app.state.service.jobs  # as if server.yaml said limits: {max_steps: 100}
    monkeypatch.setattr(jobs, "config", jobs.config.model_copy(update={"limits": JobLimits(max_steps=100)}))
    found = upload(app, keys["acme"], "acme", TICKETS)
    acme = client(app, keys["acme"])
    with pytest.raises(openai.BadRequestError) as refused:
        acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id, hyperparameters={"n_epochs": 20})
    assert refused.value.body["param"] == "hyperparameters.n_epochs"
    assert "at most 100 per job" in refused.value.body["message"]
    assert acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id,
                                        hyperparameters={"n_epochs": 1}).status == "queued"


@pytest.mark.parametrize("arguments, param, fragment", [
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations.0.type", "'wandb' is not"),
    ({"integrations": [{"type": "mlflow", "mlflow": {"experiment": "support"}}]}, "integrations",
     "no MLflow tracking server"),
    ({"integrations": [{"type": "mlflow"}]}, "integrations", "needs its settings"),
    ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata", "at most 16 pairs"),
    ({"metadata": {"k": "v" * 513}}, "metadata", "values up to 512"),
    ({"hyperparameters": {"n_epochs": 2},
      "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}},
     "hyperparameters", "not both"),
])
def test_integrations_metadata_and_conflicts_are_refused_by_name(app, keys, arguments, param, fragment):
    found = upload(app, keys["acme"], "acme", TICKETS)
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id, **arguments)
    assert refused.value.body["param"] == param and fragment in refused.value.body["message"], refused.value.body


def test_an_mlflow_integration_names_the_experiment_on_the_catalogs_server(app, keys, served):
    template = served.templates["support-tiny"]
    served.templates["support-tiny"] = template.model_copy(update={"tracking": template.tracking.model_copy(
        update={"mlflow": {"tracking_uri": "http://127.0.0.1:5999"}})})
    served.texts["support-tiny"] += "tracking: {mlflow: {tracking_uri: 'http://127.0.0.1:5999', check_reachable: false}}\n"
    found = upload(app, keys["acme"], "acme", TICKETS)
    job = client(app, keys["acme"]).fine_tuning.jobs.create(
        model="support-tiny", training_file=found.id,
        integrations=[{"type": "mlflow", "mlflow": {"experiment": "support", "tags": {"team": "care"}}}])
    http = TestClient(app, headers={"authorization": f"Bearer {keys['acme']}"})
    shown = http.get(f"/v1/fine_tuning/jobs/{job.id}").json()["integrations"]
    assert shown == [{"type": "mlflow", "mlflow": {"experiment": "support", "tags": {"team": "care"}}}]
    tracked = yaml.safe_load(Path(f"runs/{job.id}/job.yaml").read_text())["spec"]["tracking"]["mlflow"]
    assert (tracked["tracking_uri"], tracked["experiment"], tracked["tags"]) == ("http://127.0.0.1:5999", "support",
                                                                                 {"team": "care"})


def test_a_checkpoints_model_is_its_owners_model(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    acme = client(app, keys["acme"])
    job = acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id)
    manifest = {"step": 4, "files": {}, "metrics": {"loss": 1.5}}
    folder = Path(f"runs/{job.id}/checkpoints/step-000004")
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = acme.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    assert acme.models.retrieve(checkpoint).id == checkpoint
    with pytest.raises(openai.NotFoundError):
        client(app, keys["other"]).models.retrieve(checkpoint)  # another project's: as if it did not exist
    with pytest.raises(openai.NotFoundError):
        acme.models.retrieve(checkpoint.replace("ckpt-step-4", "ckpt-step-8"))


def test_a_deeply_nested_request_body_is_400_not_500(app, keys):
    http = TestClient(app, headers={"authorization": f"Bearer {keys['acme']}", "content-type": "application/json"},
                      raise_server_exceptions=False)
    answer = http.post("/v1/fine_tuning/jobs", content='{"model": ' + "[" * 30000 + "]" * 30000 + "}")
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", answer.text


def test_tenants_see_no_server_paths_or_admin_commands(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    acme = client(app, keys["acme"])
    job = acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id)
    run = Path("runs", job.id).absolute()
    info = json.loads((run / "run.json").read_text())
    error = (f"the driver (pid 4242) is gone without recording an outcome (killed: out of memory, kill -9, a reboot); "
             f"its log: {run}/logs/driver.log; last complete checkpoint {run}/checkpoints/step-000004; continue "
             f"with: tunerun run JOB --resume {job.id} --storage {run.parent}")
    (run / "run.json").write_text(json.dumps(info | {"state": "failed", "error_kind": "user", "error": error}))
    (run / "data").mkdir()
    counts = dict.fromkeys(("malformed", "empty", "duplicates", "near_duplicates", "fuzzy_duplicates",
                            "too_long_dropped"), 0)
    (run / "data" / "data_report.json").write_text(json.dumps(
        {"files": [f"{run.parent}/_service/files/acme/{found.id}.jsonl"], **counts}))
    http = TestClient(app, headers={"authorization": f"Bearer {keys['acme']}"})
    shown = [http.get(f"/v1/fine_tuning/jobs/{job.id}").json()["error"]["message"],
             json.dumps(http.get(f"/v1/fine_tuning/jobs/{job.id}/data_report").json())]
    for text in shown:
        assert str(run.parent) not in text and "tunerun run" not in text and "--resume" not in text, text
    assert "step-000004" in shown[0] and f"{found.id}.jsonl" in shown[1]
