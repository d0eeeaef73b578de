"""The audit trail: every state-changing request, over a real socket on loopback with the official `openai` client,
leaves exactly one record — never a key or a file's content (no training: jobs stay queued).

The server runs in this process without its lifespan (`loopback.serving`), so no scheduler starts a driver.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from loopback import serving
from service_calls import TICKETS, validated

from tunerun.jobs.service import audit as audit_module
from tunerun.jobs.service.audit import AUDIT, MAX_FIELD, AuditRecord, AuditTrail
from tunerun.jobs.service.keys import KEY_PATTERN
from tunerun.jobs.spec import StorageSpec


def key_id(key: str) -> str:
    return KEY_PATTERN.fullmatch(key).group(1)


def trail(served) -> AuditTrail:
    return AuditTrail(served.config.storage)


def raw_trail(served) -> bytes:
    """Every byte the trail holds, as stored."""
    root = Path(served.config.storage.uri)
    return b"".join(path.read_bytes() for path in sorted((root / AUDIT).rglob("*.jsonl")))


def seen(records: list[AuditRecord]) -> list[tuple]:
    return [(r.action, r.project, r.key_id, r.address, r.object, r.result) for r in records]


@pytest.fixture
def server(app, free_port):
    with serving(app, free_port()) as url:
        yield url


def api(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_each_state_changing_request_leaves_one_record_with_who_what_and_how_it_ended(app, server, keys, served,
                                                                                      tmp_path):
    acme, other = api(server, keys["acme"]), api(server, keys["other"])
    marker = "Parcel 7Q-MARKER-unique-content arrived crushed"
    data = tmp_path / "tickets.jsonl"
    data.write_text(TICKETS.read_text() + json.dumps({"messages": [
        {"role": "user", "content": marker}, {"role": "assistant", "content": "category: shipping"}]}) + "\n")
    kept = acme.files.create(file=data.open("rb"), purpose="fine-tune")
    validated(app, "acme", kept.id)
    dropped = acme.files.create(file=data.open("rb"), purpose="fine-tune")
    assert acme.files.delete(dropped.id).deleted
    job = acme.fine_tuning.jobs.create(model="support-tiny", training_file=kept.id)
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):  # only a running job pauses, only a paused one resumes
        acme.fine_tuning.jobs.pause(job.id)
    with pytest.raises(openai.BadRequestError):
        acme.fine_tuning.jobs.resume(job.id)
    with pytest.raises(openai.BadRequestError):
        acme.fine_tuning.jobs.create(model="support-tiny", training_file=kept.id, hyperparameters={"n_epochs": -1})
    with pytest.raises(openai.NotFoundError):  # another project's job is a job that does not exist
        other.fine_tuning.jobs.cancel(job.id)
    long_id = "file-" + "x" * 900
    with pytest.raises(openai.NotFoundError):
        acme.files.delete(long_id)
    acme.files.list(), acme.fine_tuning.jobs.retrieve(job.id)  # reads: no records
    with pytest.raises(openai.AuthenticationError):  # nobody's request: refused before it is anyone's, not kept
        api(server, keys["acme"][:-3] + "abc").files.delete(kept.id)

    acme_id, other_id = key_id(keys["acme"]), key_id(keys["other"])
    assert seen(trail(served).read()) == [
        ("create_file", "acme", acme_id, "127.0.0.1", kept.id, 200),
        ("create_file", "acme", acme_id, "127.0.0.1", dropped.id, 200),
        ("delete_file", "acme", acme_id, "127.0.0.1", dropped.id, 200),
        ("create_job", "acme", acme_id, "127.0.0.1", job.id, 200),
        ("cancel_job", "acme", acme_id, "127.0.0.1", job.id, 200),
        ("pause_job", "acme", acme_id, "127.0.0.1", job.id, 400),
        ("resume_job", "acme", acme_id, "127.0.0.1", job.id, 400),
        ("create_job", "acme", acme_id, "127.0.0.1", None, 400),
        ("cancel_job", "other", other_id, "127.0.0.1", job.id, 404),
        ("delete_file", "acme", acme_id, "127.0.0.1", long_id[:MAX_FIELD - 1] + "…", 404),
    ]
    stored = raw_trail(served)
    for key in keys.values():  # neither a key nor its secret, in any form
        assert key.encode() not in stored and key.rsplit("-", 1)[1].encode() not in stored
    assert b"MARKER" not in stored and b"Priya" not in stored and b"tickets.jsonl" not in stored


def test_dashboard_sign_in_and_out_are_recorded_with_the_key_id_a_failed_sign_in_without_a_project(server, keys,
                                                                                                   served):
    def signin_token(browser: httpx.Client) -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/signin").text).group(1)

    with httpx.Client(base_url=server, follow_redirects=False) as browser:
        wrong = browser.post("/signin", data={"api_key": keys["acme"][:-3] + "abc",
                                              "csrf_token": signin_token(browser)})
        assert wrong.status_code == 401
        assert browser.post("/signin", data={"api_key": keys["acme"],
                                             "csrf_token": signin_token(browser)}).status_code == 303
        page_token = re.search(r'<meta name="csrf-token" content="([^"]+)"', browser.get("/").text).group(1)
        missing = "ftjob-" + "0" * 24  # a button of the dashboard: the session's key id is the record's
        assert browser.post(f"/v1/fine_tuning/jobs/{missing}/cancel",
                            headers={"X-CSRF-Token": page_token}).status_code == 404
        assert browser.post("/signout", data={"csrf_token": page_token}).status_code == 303
    assert seen(trail(served).read()) == [
        ("sign_in", None, None, "127.0.0.1", None, 401),
        ("sign_in", "acme", key_id(keys["acme"]), "127.0.0.1", None, 303),
        ("cancel_job", "acme", key_id(keys["acme"]), "127.0.0.1", missing, 404),
        ("sign_out", "acme", key_id(keys["acme"]), "127.0.0.1", None, 303),
    ]
    assert keys["acme"].encode() not in raw_trail(served)


def test_a_record_the_storage_refuses_is_logged_and_the_request_keeps_its_result(app, server, keys, served,
                                                                               monkeypatch, caplog):
    acme = api(server, keys["acme"])
    found = acme.files.create(file=TICKETS.open("rb"), purpose="fine-tune")

    def full_disk(key: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(app.state.service.audit.backend, "append", full_disk)
    with caplog.at_level(logging.ERROR, logger="tunerun.serve"):
        assert acme.files.delete(found.id).deleted  # done: the trail's failure does not make it a 500
    lost = [r.getMessage() for r in caplog.records if "audit record lost" in r.getMessage()]
    assert len(lost) == 1 and '"action": "delete_file"' in lost[0] and found.id in lost[0]
    assert keys["acme"] not in lost[0]
    assert [r.action for r in trail(served).read()] == ["create_file"]


def test_a_read_of_the_last_days_reads_only_their_segments(served, monkeypatch):
    writer, now = trail(served), time.time()
    for days_ago in (10, 3, 0):
        writer.record(AuditRecord(time=now - days_ago * 86400, action="delete_file", result=200, project="acme"))
    monkeypatch.setattr(audit_module, "SEGMENT_BYTES", 1)  # every record starts a segment of its own
    writer.record(AuditRecord(time=now, action="create_file", result=200, project="other"))
    reader = trail(served)
    read_keys: list[str] = []
    get = reader.backend.get
    monkeypatch.setattr(reader.backend, "get", lambda key: read_keys.append(key) or get(key))
    week = reader.read(since=now - 7 * 86400)
    assert [(r.action, round((now - r.time) / 86400)) for r in week] == [("delete_file", 3), ("delete_file", 0),
                                                                         ("create_file", 0)]
    old_day = dt.datetime.fromtimestamp(now - 10 * 86400, dt.timezone.utc).strftime("%Y-%m-%d")
    assert read_keys and not any(old_day in key for key in read_keys)
    assert len({key.split("/")[2] for key in read_keys}) == 2  # the two days from `since` on, nothing older
    assert [r.project for r in reader.read(project="other")] == ["other"]


def test_cli_key_changes_are_recorded_and_audit_filters_by_project_and_since(served, tunerun, tmp_path):
    env_dir = tmp_path
    made = tunerun("serve", "keys", "create", "globex", "--config", "server.yaml", cwd=env_dir, timeout=120)
    assert made.returncode == 0, made.stderr
    new_id = key_id(made.stdout.strip())
    revoked = tunerun("serve", "keys", "revoke", new_id, "--config", "server.yaml", cwd=env_dir, timeout=120)
    assert revoked.returncode == 0, revoked.stderr
    trail(served).record(AuditRecord(time=time.time() - 10 * 86400, action="delete_file", result=200,
                                     project="globex", key_id=new_id, address="10.0.0.9", object="file-old"))
    trail(served).record(AuditRecord(time=time.time(), action="delete_file", result=200, project="acme",
                                     key_id="0123456789ab", address="10.0.0.8", object="file-acme"))
    week = tunerun("serve", "audit", "--config", "server.yaml", "--project", "globex", "--since", "7d", "--json",
                   cwd=env_dir, timeout=120)
    assert week.returncode == 0, week.stderr
    lines = [json.loads(line) for line in week.stdout.splitlines()]
    assert [(r["action"], r["project"], r["key_id"], r["result"]) for r in lines] == [
        ("create_key", "globex", new_id, "ok"), ("revoke_key", "globex", new_id, "ok")]
    assert all(r["address"].startswith("cli:") for r in lines)
    assert made.stdout.strip() not in week.stdout and made.stdout.strip().encode() not in raw_trail(served)
    month = tunerun("serve", "audit", "--config", "server.yaml", "--project", "globex", "--since", "30d",
                    cwd=env_dir, timeout=120)
    assert month.returncode == 0, month.stderr
    assert "file-old" in month.stdout and "10.0.0.9" in month.stdout and "file-acme" not in month.stdout
    assert "3 records" in month.stdout
    wrong = tunerun("serve", "audit", "--config", "server.yaml", "--since", "last week", cwd=env_dir, timeout=120)
    assert wrong.returncode == 2 and "7d, 12h, 30m" in wrong.stderr


def test_on_s3_two_writers_at_once_lose_no_record(s3_server):
    """A server and `tunerun serve keys …` append to the same day at once: each writes its own segments, so
    neither one's rewrite of an object (S3 has no append) can drop the other's records."""
    storage = StorageSpec(uri=f"s3://{s3_server.bucket(f'audit-{uuid.uuid4().hex[:12]}')}/tunerun",
                          endpoint_url=s3_server.endpoint)
    now = time.time()

    def write(name: str) -> None:
        writer = AuditTrail(storage)
        for i in range(15):
            writer.record(AuditRecord(time=now, action="delete_file", result=200, project="acme",
                                      object=f"{name}-{i}"))

    writers = [threading.Thread(target=write, args=(name,)) for name in ("server", "cli")]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    found = sorted(r.object for r in AuditTrail(storage).read(since=now - 60))
    assert found == sorted(f"{name}-{i}" for name in ("server", "cli") for i in range(15))
