"""The service's API through the official `openai` client, against the app in this process (no training).

The client talks HTTP to the FastAPI app through Starlette's test transport, so every request goes through the
same routing, validation, authentication and error handling as on a socket. The app's background parts
(validation of uploads, the local queue) run only where a test starts them: jobs made here stay ``queued``.
Training through the service is in tests/e2e/test_serve.py.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import yaml
from fastapi.testclient import TestClient
from service_calls import REPO, TICKETS, client, upload, validated, write_lines

from tunerun.jobs.errors import SpecError
from tunerun.jobs.service import fine_tuning
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.keys import KeyStore


# ── files ───────────────────────────────────────────────────────────────────────────────────────────────────

def test_an_upload_is_stored_validated_listed_read_back_and_deleted(app, keys):
    acme = client(app, keys["acme"])
    found = acme.files.create(file=TICKETS.open("rb"), purpose="fine-tune")
    assert found.status == "uploaded" and found.bytes == TICKETS.stat().st_size and found.filename == TICKETS.name
    validated(app, "acme", found.id)
    assert acme.files.retrieve(found.id).status == "processed"
    assert [f.id for f in acme.files.list().data] == [found.id]
    assert acme.files.content(found.id).read() == TICKETS.read_bytes()
    assert acme.files.delete(found.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(found.id)


def test_a_file_with_broken_lines_fails_validation_naming_them(app, keys, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    lines = [good] * 40 + ['{"messages": [ broken', good, '{"prompt": "no such format"}']
    found = upload(app, keys["acme"], "acme", write_lines(tmp_path / "broken.jsonl", lines))
    assert found.status == "error"
    assert "line 41" in found.status_details and "line 43" in found.status_details
    assert "2 of 43 records" in found.status_details


def test_a_few_bad_lines_below_the_allowed_share_are_listed_but_processed(app, keys, tmp_path):
    good = json.dumps({"instruction": "say hi", "output": "hi"})
    found = upload(app, keys["acme"], "acme", write_lines(tmp_path / "mostly.jsonl", [good] * 200 + ["{oops"]))
    assert found.status == "processed" and "line 201" in found.status_details


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", b"", "is empty"),
    ("table.csv", b"a,b\n1,2\n", "fine-tuning files are JSONL"),
    ("notjson.jsonl", b"hello world\n", "first line is not a JSON object"),
    ("../../escape.jsonl", b'{"text": "x"}\n', "plain file name"),
])
def test_uploads_that_cannot_be_training_files_are_refused_at_once(app, keys, tmp_path, name, content, fragment):
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).files.create(file=(name, content), purpose="fine-tune")
    assert fragment in refused.value.body["message"] and refused.value.body["param"] == "file"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert app.state.service.files.list("acme") == []  # nothing half-written


def test_a_file_over_the_limit_is_413_and_leaves_nothing(app, keys, tmp_path):
    big = write_lines(tmp_path / "big.jsonl", [json.dumps({"text": "x" * 1000})] * 300)
    with pytest.raises(openai.APIStatusError) as refused:
        client(app, keys["acme"]).files.create(file=big.open("rb"), purpose="fine-tune")
    assert refused.value.status_code == 413 and "200,000 bytes" in refused.value.body["message"]
    assert app.state.service.files.list("acme") == []


# ── keys and projects ───────────────────────────────────────────────────────────────────────────────────────

def test_a_wrong_or_revoked_key_is_401(app, keys, served):
    with pytest.raises(openai.AuthenticationError):
        client(app, "tr-000000000000-" + "x" * 43).files.list()
    with pytest.raises(openai.AuthenticationError):
        client(app, "not even a key").models.list()
    store = KeyStore(served.config.storage)
    record = next(r for r in store.list() if r.project == "other")
    store.revoke(record.key_id)
    with pytest.raises(openai.AuthenticationError):
        client(app, keys["other"]).files.list()
    assert client(app, keys["acme"]).files.list().data == []


def test_keys_are_stored_only_as_hashes(keys, served):
    service = Path(served.config.storage.uri) / "_service"
    stored = "".join(path.read_text() for path in service.rglob("*") if path.is_file())
    assert keys["acme"].split("-")[1] in stored  # the key id is there, to find the record by
    assert keys["acme"] not in stored and keys["acme"].split("-", 2)[2] not in stored
    assert not (service / "keys.json").exists()  # one object per key now, never the old shared file
    assert KeyStore(served.config.storage).project_of(keys["acme"]) == "acme"


def test_another_projects_objects_answer_404(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    job = client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id)
    assert job.seed == 42  # no seed in the request: the spec's
    other = client(app, keys["other"])
    for call in (lambda: other.files.retrieve(found.id), lambda: other.files.content(found.id),
                 lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.fine_tuning.jobs.cancel(job.id),
                 lambda: other.fine_tuning.jobs.list_events(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as refused:
        other.fine_tuning.jobs.create(model="support-tiny", training_file=found.id)
    assert refused.value.body["param"] == "training_file"
    assert other.fine_tuning.jobs.list().data == [] and other.files.list().data == []


# ── jobs ────────────────────────────────────────────────────────────────────────────────────────────────────

def test_a_job_is_a_queued_run_with_the_request_applied(app, keys, served):
    found = upload(app, keys["acme"], "acme", TICKETS)
    acme = client(app, keys["acme"])
    job = acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id, suffix="tickets-v2", seed=7,
                                       hyperparameters={"n_epochs": 3, "batch_size": 16,
                                                        "learning_rate_multiplier": 0.5},
                                       metadata={"ticket": "T-1"})
    assert job.status == "queued" and job.organization_id == "acme" and job.seed == 7
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (3, 16)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    spec = yaml.safe_load((Path("runs") / job.id / "job.yaml").read_text())
    assert spec["spec"]["training"]["epochs"] == 3 and spec["spec"]["training"]["seed"] == 7
    assert spec["spec"]["training"]["learning_rate"] == pytest.approx(5.0e-4)
    assert spec["spec"]["data"]["train"].endswith(f"_service/files/acme/{found.id}.jsonl")
    assert spec["spec"]["storage"]["uri"] == str(Path("runs").absolute())
    assert [j.id for j in acme.fine_tuning.jobs.list(metadata={"ticket": "T-1"}).data] == [job.id]
    assert acme.fine_tuning.jobs.list(metadata={"ticket": "T-2"}).data == []
    events = acme.fine_tuning.jobs.list_events(job.id).data
    assert [e.message for e in events] == ["Job queued: waiting for a free slot"]
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_job_list_is_newest_created_first_and_pages_with_after_and_limit(app, keys, monkeypatch):
    found = upload(app, keys["acme"], "acme", TICKETS)
    acme = client(app, keys["acme"])
    # The creation times, given: not the order of the requests (a clock set back, a second server), so the list
    # must sort by created_at itself: newest (3000) first, then 2000, then 1000.
    clock = iter([3000.5, 1000.5, 2000.5])
    monkeypatch.setattr(fine_tuning, "time", SimpleNamespace(time=lambda: next(clock)))
    a, b, c = (acme.fine_tuning.jobs.create(model="support-tiny", training_file=found.id) for _ in range(3))
    assert [a.created_at, b.created_at, c.created_at] == [3000, 1000, 2000]
    first = acme.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == [a.id, c.id] and first.has_more
    rest = acme.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == [b.id] and not rest.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(after=a.id, limit=1).data] == [c.id]


@pytest.mark.parametrize("arguments, param, fragment", [
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs", "above 0"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", "'auto' or a number"),
    ({"hyperparameters": {"batch_size": 3}}, "hyperparameters.batch_size", "multiple"),
    ({"suffix": "x" * 65}, "suffix", "1 to 64"),
    ({"suffix": "a;rm -rf /"}, "suffix", "letters, digits"),
    ({"method": {"type": "reinforcement"}}, "method.type", "'reinforcement' is not available"),
    ({"seed": "seven"}, "seed", "integer"),
])
def test_bad_job_requests_are_400_naming_the_parameter(app, keys, arguments, param, fragment):
    found = upload(app, keys["acme"], "acme", TICKETS)
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).fine_tuning.jobs.create(model="support-tiny", training_file=found.id, **arguments)
    body = refused.value.body
    assert body["param"] == param and fragment in body["message"], body
    assert not list(Path("runs").glob("ftjob-*"))  # nothing half-written


def test_unknown_model_is_404_listing_the_catalog(app, keys):
    found = upload(app, keys["acme"], "acme", TICKETS)
    with pytest.raises(openai.NotFoundError) as refused:
        client(app, keys["acme"]).fine_tuning.jobs.create(model="gpt-4o", training_file=found.id)
    assert "support-tiny" in refused.value.body["message"] and refused.value.body["param"] == "model"


def test_a_job_on_a_file_still_being_validated_or_failed_is_400(app, keys, tmp_path):
    acme = client(app, keys["acme"])
    busy = threading.Event()
    app.state.service.validator.pool.submit(busy.wait)  # the validator is still on an earlier upload
    try:
        pending = acme.files.create(file=TICKETS.open("rb"), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as refused:
            acme.fine_tuning.jobs.create(model="support-tiny", training_file=pending.id)
    finally:
        busy.set()
    assert refused.value.body["code"] == "file_not_ready" and refused.value.body["param"] == "training_file"
    broken = upload(app, keys["acme"], "acme", write_lines(tmp_path / "b.jsonl", ['{"x": 1}'] * 5))
    with pytest.raises(openai.BadRequestError) as refused:
        acme.fine_tuning.jobs.create(model="support-tiny", training_file=broken.id)
    assert "failed validation" in refused.value.body["message"]


def test_malformed_bodies_are_400_in_openais_shape(app, keys):
    http = TestClient(app)
    headers = {"Authorization": f"Bearer {keys['acme']}", "Content-Type": "application/json"}
    response = http.post("/v1/fine_tuning/jobs", content=b"{not json", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = http.post("/v1/fine_tuning/jobs", json={"model": "support-tiny"}, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    response = http.post("/v1/fine_tuning/jobs", json={"model": 5, "training_file": "f", "colour": "red"},
                         headers=headers)
    assert response.status_code == 400 and response.headers["x-should-retry"] == "false"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/nowhere", headers=headers).status_code == 404


def test_models_list_the_catalog(app, keys):
    models = client(app, keys["acme"]).models.list().data
    assert [(m.id, m.owned_by) for m in models] == [("support-tiny", "tunerun")]
    assert models[0].tunerun == {"callable": False}  # no inference engine serves it


# ── the configuration ───────────────────────────────────────────────────────────────────────────────────────

def test_the_config_is_checked_like_a_job_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad Name\nmodel: {path: m}\n")
    (tmp_path / "server.yaml").write_text(
        "storage: {uri: ./runs}\ntarget: lsf\nmax_concurent_runs: 2\nmodels:\n  a: {job: bad.yaml}\n")
    with pytest.raises(SpecError) as caught:
        load_server_config(tmp_path / "server.yaml")
    text = str(caught.value)
    assert "line 2     target: expected" in text and "local, ray, slurm, k8s (got 'lsf')" in text
    assert "line 3     max_concurent_runs: unknown key — did you mean 'max_concurrent_runs'?" in text
    (tmp_path / "server.yaml").write_text("storage: {uri: ./runs}\nmodels:\n  a: {job: bad.yaml}\n")
    with pytest.raises(SpecError) as caught:
        load_server_config(tmp_path / "server.yaml")
    assert "models.a.job: bad.yaml: name (line 1):" in str(caught.value)  # the template's own problems


def test_the_shipped_example_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where the README runs it
    served = load_server_config(REPO / "examples" / "server.yaml")
    assert list(served.templates) == ["support-tiny"] and served.config.target == "local"



def test_health_needs_no_key_and_everything_else_does(app):
    with TestClient(app) as http:  # the server's lifespan: its scheduler runs
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/v1/models").status_code == 401


def test_health_reports_a_dead_scheduler(app):
    with TestClient(app) as http:
        scheduler = app.state.service.scheduler
        scheduler.stop()
        scheduler._thread.join(timeout=10)
        answer = http.get("/healthz")
        assert answer.status_code == 503 and answer.json()["scheduler"] == "stopped", answer.text
