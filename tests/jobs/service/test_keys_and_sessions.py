"""API keys and dashboard sessions shared by several processes on one storage (no training).

The server, `tunerun serve keys …` and a second server all write the key store at once; these tests run the
other writer as a real separate process, because the lost updates they guard against happen between processes.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tunerun.jobs.service import keys as keys_module
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.keys import KeyStore, KeyStoreError
from tunerun.jobs.service.sessions import SESSION_COOKIE, SessionSigner
from tunerun.jobs.spec import StorageSpec

# Both run as their own process, like `tunerun serve keys revoke|create` beside a running server.
REVOKER = """
import sys, time
from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.spec import StorageSpec
store = KeyStore(StorageSpec(uri=sys.argv[1]))
for key_id in sys.argv[2:]:
    store.revoke(key_id)
    time.sleep(0.005)
"""
CREATOR = """
import sys, time
from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.spec import StorageSpec
store = KeyStore(StorageSpec(uri=sys.argv[1]))
for _ in range(int(sys.argv[2])):
    print(store.create("late")[1], flush=True)
    time.sleep(0.005)
"""


def _storage(served) -> StorageSpec:
    return served.config.storage


def test_revocations_and_new_keys_survive_a_server_noting_uses(served, monkeypatch):
    """40 keys in use (last-used noted on every call) while one process revokes them and another makes keys:
    every revocation holds and every key that was printed works."""
    monkeypatch.setattr(keys_module, "LAST_USED_EVERY_S", 0.0)
    store = KeyStore(_storage(served))
    made = [store.create(f"p{i % 4}") for i in range(40)]
    in_use = [key for _, key in made]
    stop = threading.Event()

    def use_keys():
        while not stop.is_set():
            for key in in_use:
                store.record_of(key)

    users = [threading.Thread(target=use_keys) for _ in range(3)]
    for user in users:
        user.start()
    uri = str(Path(_storage(served).uri).resolve())
    try:
        revoker = subprocess.Popen([sys.executable, "-c", REVOKER, uri, *(r.key_id for r, _ in made)])
        creator = subprocess.Popen([sys.executable, "-c", CREATOR, uri, "40"], stdout=subprocess.PIPE, text=True)
        created = creator.communicate(timeout=60)[0].split()
        assert revoker.wait(timeout=60) == 0 and creator.returncode == 0
    finally:
        stop.set()
        for user in users:
            user.join()
    fresh = KeyStore(_storage(served))
    still_accepted = [key[:15] for key in in_use if fresh.project_of(key) is not None]
    lost = [key[:15] for key in created if fresh.project_of(key) != "late"]
    assert len(created) == 40 and (still_accepted, lost) == ([], []), \
        f"{len(still_accepted)} revoked keys still accepted, {len(lost)} printed keys lost"
    listed = {r.key_id: r for r in fresh.list()}
    assert all(listed[r.key_id].revoked_at is not None for r, _ in made)


def test_a_failed_last_used_write_never_fails_the_request(served, monkeypatch, caplog):
    store = KeyStore(_storage(served))
    _, key = store.create("acme")

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.backend, "put", disk_full)
    with caplog.at_level(logging.WARNING, logger="tunerun.serve"):
        assert store.project_of(key) == "acme"
    assert any(r.name == "tunerun.serve" and "last use" in r.getMessage() for r in caplog.records)


def test_list_shows_last_use_and_revocation(served):
    store = KeyStore(_storage(served))
    used, key = store.create("acme")
    revoked, _ = store.create("acme")
    assert store.project_of(key) == "acme"
    store.revoke(revoked.key_id)
    first = store.revoke(revoked.key_id)  # revoking again keeps the first time
    listed = {r.key_id: r for r in KeyStore(_storage(served)).list()}
    assert listed[used.key_id].last_used_at is not None and listed[used.key_id].revoked_at is None
    assert listed[revoked.key_id].revoked_at == first.revoked_at
    with pytest.raises(KeyStoreError, match="no key with id 'feedfeedfeed'"):
        store.revoke("feedfeedfeed")


def _legacy_keys_json(root: Path, keys: dict[str, str]) -> Path:
    """A keys.json as tunerun wrote it before keys had one object each."""
    records = [{"key_id": key.split("-")[1], "project": project, "created_at": 1.0e9, "revoked_at": None,
                "last_used_at": None, "sha256": hashlib.sha256(key.encode()).hexdigest()}
               for project, key in keys.items()]
    path = root / "_service" / "keys.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": records}, indent=2) + "\n")
    return path


def test_keys_from_a_legacy_keys_json_keep_working_and_can_be_revoked(served):
    legacy = {"acme": "tr-0123456789ab-" + "a" * 43, "other": "tr-ba9876543210-" + "b" * 43}
    path = _legacy_keys_json(Path(_storage(served).uri), legacy)
    before = path.read_text()
    store = KeyStore(_storage(served))
    assert store.project_of(legacy["acme"]) == "acme" and store.project_of(legacy["other"]) == "other"
    _, new_key = store.create("acme")
    store.revoke("0123456789ab")
    assert store.project_of(legacy["acme"]) is None and store.active("0123456789ab") is None
    assert store.project_of(legacy["other"]) == "other" and store.project_of(new_key) == "acme"
    listed = {r.key_id: r for r in store.list()}
    assert listed["0123456789ab"].revoked_at is not None and listed["ba9876543210"].last_used_at is not None
    assert len(listed) == 3 and path.read_text() == before  # keys.json is never written again


# ── sessions ────────────────────────────────────────────────────────────────────────────────────────────────

def _browser(app) -> TestClient:
    return TestClient(app, base_url="http://testserver", follow_redirects=False)


def _with_cookie(app, cookie: str) -> TestClient:
    visitor = _browser(app)
    visitor.cookies.set(SESSION_COOKIE, cookie)
    return visitor


def test_signing_out_ends_the_session_on_every_server(app, keys, served):
    visitor = _browser(app)
    form = visitor.get("/signin")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    assert visitor.post("/signin", data={"api_key": keys["acme"], "csrf_token": token}).status_code == 303
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', visitor.get("/").text).group(1)
    kept = visitor.cookies[SESSION_COOKIE]  # a copy of the cookie, as anyone who saw it could keep
    assert _with_cookie(app, kept).get("/v1/fine_tuning/jobs").status_code == 200
    assert visitor.post("/signout", data={"csrf_token": csrf}).headers["location"] == "/signin?signed_out=1"
    copy = _with_cookie(app, kept)
    assert copy.get("/v1/fine_tuning/jobs").status_code == 401
    assert copy.get("/").headers["location"].startswith("/signin")
    assert copy.post("/v1/fine_tuning/jobs/ftjob-x/cancel", headers={"x-csrf-token": csrf}).status_code == 401
    other_server = _with_cookie(create_app(served), kept)
    assert other_server.get("/v1/fine_tuning/jobs").status_code == 401
    assert other_server.get("/").headers["location"].startswith("/signin")


def test_ended_sessions_are_forgotten_once_expired(served):
    days = 24 * 3600
    signer = SessionSigner(_storage(served), lifetime_s=5 * days)
    record, _ = KeyStore(_storage(served)).create("acme")
    live = signer.read(signer.issue(record))
    old = signer.read(signer.issue(record, now=time.time() - 5 * days + 60))  # valid for one more minute
    signer.end(live)
    signer.end(old)
    ended = Path(_storage(served).uri) / "_service" / "sessions" / "ended"
    assert len(list(ended.iterdir())) == 2
    SessionSigner(_storage(served), lifetime_s=5 * days)  # a start before either expired forgets neither
    assert len(list(ended.iterdir())) == 2
    signer.forget_expired(now=time.time() + 2 * days)
    assert len(list(ended.iterdir())) == 1 and signer.is_ended(live)


def test_a_server_never_signs_with_a_secret_still_being_written(served):
    """A second server that starts between the first one's exclusive create of the secret and its write."""
    secret = Path(_storage(served).uri) / "_service" / "session-secret"
    secret.parent.mkdir(parents=True)
    secret.touch()
    threading.Timer(0.3, lambda: secret.write_text("ab" * 32)).start()
    second = SessionSigner(_storage(served), lifetime_s=3600)
    record, _ = KeyStore(_storage(served)).create("acme")
    forged = json.dumps({"k": record.key_id, "p": "acme", "n": "0" * 32, "e": time.time() + 3600}).encode()
    payload = base64.urlsafe_b64encode(forged)
    cookie = f"{payload.decode()}.{hmac.new(b'', payload, hashlib.sha256).hexdigest()}"  # signed with nothing
    assert second.read(cookie) is None
    assert SessionSigner(_storage(served), lifetime_s=3600).read(second.issue(record)) is not None


# ── S3 ──────────────────────────────────────────────────────────────────────────────────────────────────────

def test_keys_and_ended_sessions_on_s3(s3_server):
    storage = StorageSpec(uri=f"s3://{s3_server.bucket(f'keys-{uuid.uuid4().hex[:12]}')}/svc",
                          endpoint_url=s3_server.endpoint)
    store = KeyStore(storage)
    record, key = store.create("acme")
    assert store.project_of(key) == "acme"
    store.revoke(record.key_id)
    other = KeyStore(storage)
    assert other.project_of(key) is None and other.list()[0].revoked_at is not None
    signer = SessionSigner(storage, lifetime_s=3600)
    _, key = store.create("acme")
    session = signer.read(signer.issue(store.record_of(key)))
    signer.end(session)
    assert SessionSigner(storage, lifetime_s=3600).read(signer.issue(store.record_of(key))) is not None
    assert SessionSigner(storage, lifetime_s=3600).is_ended(session)
