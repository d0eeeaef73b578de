"""What an API call costs the storage with 1,000 finished jobs in a project, on a local folder and on an S3 server.

Counted, not timed: every call the server makes to its storage backend (a file operation on a local folder; an S3
request, counted again as botocore sends it) while it answers one request, after a first answer has warmed it up
as a running server is. A page of N jobs must read about N objects whatever the project holds, one job or its
result file a few; a scheduler tick reads nothing of finished jobs; the server makes one S3 client. Before the
index (issue #26), a page of 20 cost 1,046 local operations and 1,089 S3 requests from 1,000 new clients.
"""
from __future__ import annotations

import collections
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from tunerun.cluster import s3
from tunerun.cluster.s3 import S3Backend
from tunerun.cluster.storage import LocalBackend
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.keys import KeyStore

JOBS = 1000
OPERATIONS = ("get", "put", "put_new", "append", "exists", "list", "children")
NOW = 1_700_000_000.0
TEMPLATE = "name: support\nmodel: {path: MODEL}\nmethod: {kind: lora}\n"


def job_id(n: int) -> str:
    return f"ftjob-{n:024x}"


def ledger(count: int) -> dict[str, bytes]:
    """``count`` finished jobs of project acme as the service leaves them (key → bytes): the record, run.json
    and 8 steps of metrics."""
    files = {}
    for n in range(count):
        folder = job_id(n)
        files[f"{folder}/service.json"] = json.dumps({
            "job_id": folder, "project": "acme", "model": "support-tiny", "created_at": NOW + n,
            "request": {"model": "support-tiny", "training_file": "file-" + "0" * 24}, "result_file": f"file-{n:024x}",
            "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}, "seed": 42}).encode()
        files[f"{folder}/run.json"] = json.dumps({"run_id": folder, "state": "succeeded", "target": "local",
                                                  "created_at": NOW, "finished_at": NOW + n}).encode()
        files[f"{folder}/metrics.jsonl"] = b"".join(json.dumps({
            "time": NOW, "step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 900.0, "tokens_seen": 1000 * s,
            "total_steps": 8, "elapsed_s": float(s)}).encode() + b"\n" for s in range(1, 9))
    return files


class Counter:
    """Every backend call and every S3 request the process makes, by name."""

    def __init__(self, monkeypatch):
        self.calls: collections.Counter = collections.Counter()
        self.new_clients = 0
        for backend in (LocalBackend, S3Backend):
            for name in OPERATIONS:
                monkeypatch.setattr(backend, name, self._counted(getattr(backend, name), name))
        made = s3._new_client

        def new_client(storage):
            self.new_clients += 1
            found = made(storage)
            found.meta.events.register("before-call.s3", self._request, unique_id="test-storage-reads")
            return found

        monkeypatch.setattr(s3, "_new_client", new_client)
        monkeypatch.setattr(s3, "_clients", {})  # clients made before this test carry no counter

    def _counted(self, method, name):
        def counted(backend, *args, **kwargs):
            self.calls[name] += 1
            return method(backend, *args, **kwargs)
        return counted

    def _request(self, model, **_):
        self.calls[f"s3 {model.name}"] += 1

    @contextmanager
    def one(self):
        """Counts of the block alone: ``operations`` (backend calls) and ``requests`` (S3 requests)."""
        self.calls.clear()
        clients = self.new_clients
        seen = {}
        yield seen
        seen["operations"] = sum(n for name, n in self.calls.items() if not name.startswith("s3 "))
        seen["requests"] = sum(n for name, n in self.calls.items() if name.startswith("s3 "))
        seen["new_clients"] = self.new_clients - clients
        seen["calls"] = dict(self.calls)


@pytest.fixture
def served_at(tmp_path, stub_model_dir, monkeypatch):
    """A server on ``storage`` (the server.yaml block) with ledger jobs already there: (http client, key, app)."""
    monkeypatch.chdir(tmp_path)

    def serve(storage: str):
        (tmp_path / "support.yaml").write_text(TEMPLATE.replace("MODEL", str(stub_model_dir)))
        (tmp_path / "server.yaml").write_text(f"storage: {storage}\nmodels:\n  support-tiny: {{job: support.yaml}}\n")
        served = load_server_config(tmp_path / "server.yaml")
        key = KeyStore(served.config.storage).create("acme")[1]
        app = create_app(served)
        return TestClient(app, headers={"authorization": f"Bearer {key}"}), key, app

    return serve


def measure(counter: Counter, http: TestClient, app) -> dict[str, dict]:
    """Each call answered twice (a running server has answered it before), then counted."""
    middle = JOBS // 2
    calls = {
        "list 20": "/v1/fine_tuning/jobs?limit=20",
        "list 100 (the dashboard's poll)": "/v1/fine_tuning/jobs?limit=100",
        "list 20 after a cursor": f"/v1/fine_tuning/jobs?limit=20&after={job_id(middle)}",
        "retrieve": f"/v1/fine_tuning/jobs/{job_id(middle)}",
        "result file": f"/v1/files/file-{middle:024x}",
        "models": "/v1/models",
    }
    found = {}
    for name, path in calls.items():
        for _ in range(2):
            assert http.get(path).status_code == 200
        with counter.one() as seen:
            answer = http.get(path)
        assert answer.status_code == 200, answer.text
        found[name] = seen
    scheduler = app.state.service.scheduler
    scheduler.tick()
    time.sleep(app.state.service.jobs.index.refresh_s)  # the tick's listing is due again
    with counter.one() as seen:
        scheduler.tick()
    found["scheduler tick"] = seen
    return found


def check(found: dict[str, dict], what: str) -> None:
    # One read per job shown, the key's revocation check, and a listing when one is due (on S3, a request per
    # 1,000 folders).
    listing = 1 if what == "operations" else 2
    bounds = {"list 20": 20 + 1 + listing, "list 100 (the dashboard's poll)": 100 + 1 + listing,
              "list 20 after a cursor": 20 + 1 + listing, "retrieve": 2 + listing, "result file": 2 + listing,
              "models": 1 + listing, "scheduler tick": listing}
    for name, most in bounds.items():
        seen = found[name]
        assert seen[what] <= most, f"{name}: {seen[what]} {what} (at most {most}): {seen['calls']}"
        assert seen["new_clients"] == 0, f"{name} made a storage client"


def test_a_page_reads_its_jobs_only_on_a_local_folder(served_at, monkeypatch, tmp_path):
    for key, data in ledger(JOBS).items():
        (tmp_path / "runs" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / key).write_bytes(data)
    counter = Counter(monkeypatch)
    http, key, app = served_at("{uri: ./runs}")
    page = http.get("/v1/fine_tuning/jobs?limit=20").json()
    assert [j["id"] for j in page["data"]] == [job_id(n) for n in range(JOBS - 1, JOBS - 21, -1)] and page["has_more"]
    assert page["data"][0]["status"] == "succeeded" and page["data"][0]["tunerun"]["step"] == 8
    check(measure(counter, http, app), "operations")


@pytest.mark.slow  # 3,000 objects to upload and learn: about two minutes on 2 cores
def test_a_page_reads_its_jobs_only_on_s3(served_at, monkeypatch, s3_server):
    bucket = s3_server.bucket(f"reads-{uuid.uuid4().hex[:12]}")
    uploader = s3_server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: uploader.put_object(Bucket=bucket, Key=f"svc/{item[0]}", Body=item[1]),
                      ledger(JOBS).items()))
    counter = Counter(monkeypatch)
    http, key, app = served_at(f"{{uri: 's3://{bucket}/svc', endpoint_url: '{s3_server.endpoint}'}}")
    assert len(http.get("/v1/fine_tuning/jobs?limit=100").json()["data"]) == 100
    found = measure(counter, http, app)
    check(found, "operations")
    check(found, "requests")  # what reaches the S3 server: no listing pages, no retries hidden in a call


def test_a_job_written_by_another_server_is_found_at_once_and_listed_within_a_second(served_at, tmp_path):
    http, key, app = served_at("{uri: ./runs}")
    assert http.get("/v1/fine_tuning/jobs").json()["data"] == []
    for name, data in ledger(1).items():  # another server on the same storage creates a job
        (tmp_path / "runs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / name).write_bytes(data)
    assert http.get(f"/v1/fine_tuning/jobs/{job_id(0)}").json()["status"] == "succeeded"
    assert http.get(f"/v1/files/file-{0:024x}").json()["filename"] == f"{job_id(0)}-metrics.csv"
    deadline = time.monotonic() + 2 * app.state.service.jobs.index.refresh_s + 1
    while not http.get("/v1/fine_tuning/jobs").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [j["id"] for j in http.get("/v1/fine_tuning/jobs").json()["data"]] == [job_id(0)]


def test_a_key_revoked_elsewhere_stops_at_the_next_request_though_its_record_is_kept(served_at, tmp_path):
    http, key, app = served_at("{uri: ./runs}")
    assert http.get("/v1/fine_tuning/jobs").status_code == 200
    KeyStore(app.state.service.served.config.storage).revoke(key.split("-")[1])  # the CLI, another process's store
    assert http.get("/v1/fine_tuning/jobs").status_code == 401
