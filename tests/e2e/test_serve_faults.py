"""`tunerun serve` killed outright, or stopped with validations queued: what it leaves on disk, and who may read it.

An upload's copy in the temp folder and its bytes in the storage are a user's training data. A server killed with
SIGKILL while it copies them, or while it validates them, must leave nothing that the next start does not remove,
and every upload must end ``processed`` or ``error`` (an ``uploaded`` one refuses jobs forever). The server runs as a
process on loopback with a temp folder of its own (TMPDIR) and under umask 0, the most careless a shared login node
can have: every file of the service's storage is 0600 and every folder 0700 all the same. Nothing trains: the
catalog entry names a stub model that is never loaded.
"""
from __future__ import annotations

import json
import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serve_process import Server, stub_catalog

pytestmark = pytest.mark.slow

WAIT_S = 60


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def write_records(path: Path, count: int, tag: str) -> Path:
    """``count`` distinct chat records (validating 1,000 takes about half a second here)."""
    with path.open("w") as out:
        for n in range(count):
            out.write(json.dumps({"messages": [
                {"role": "user", "content": f"{tag} ticket {n}: order {n * 7919} has not arrived, what now? " * 3},
                {"role": "assistant", "content": f"Sorry about order {n * 7919}; it ships today. " * 3}]}) + "\n")
    return path


class Faulty:
    """The server of the module, what it keeps where, and the calls the tests make to it."""

    def __init__(self, root: Path, server: Server, key: str):
        self.root, self.server, self.key = root, server, key
        self.tmp, self.storage = root / "tmp", root / "runs"
        self.files = self.storage / "_service" / "files" / "acme"
        self.url = f"http://127.0.0.1:{server.port}/v1/files"

    def start(self) -> None:
        with umask(0):  # the server inherits it
            self.server.start()

    def upload(self, path: Path) -> dict:
        with path.open("rb") as data:
            answer = httpx.post(self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120,
                                files={"file": (path.name, data)}, data={"purpose": "fine-tune"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def upload_in_background(self, path: Path) -> threading.Thread:
        """The upload in a thread; once it ends, ``thread.answer`` is the file object, or None if the server died."""
        def send():
            try:
                sender.answer = self.upload(path)
            except (httpx.HTTPError, AssertionError):
                sender.answer = None  # the server was killed under it

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        return sender

    def delete(self, file_id: str) -> None:
        httpx.delete(f"{self.url}/{file_id}", headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def status(self, file_id: str) -> dict:
        return httpx.get(f"{self.url}/{file_id}", headers={"Authorization": f"Bearer {self.key}"}, timeout=30).json()

    def settled(self, file_id: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while (found := self.status(file_id))["status"] == "uploaded":
            assert time.monotonic() < deadline, f"{file_id} is still 'uploaded' after {WAIT_S} s"
            time.sleep(0.2)
        return found

    def upload_folders(self) -> list[Path]:
        return sorted(self.tmp.glob("tunerun-upload-*"))

    def partials(self) -> list[Path]:
        return sorted(self.storage.rglob("*.part"))

    def orphans(self) -> list[Path]:
        return [p for p in self.files.glob("*.jsonl") if not p.with_suffix(".json").exists()]

    def copying(self, size: int) -> bool:
        """Whether the upload's bytes are being copied into the storage: a temp file for them, or (written in
        place) fewer than ``size`` of them with no file object beside them."""
        return bool(list(self.files.glob(".*.jsonl.*"))) or any(p.stat().st_size < size for p in self.orphans())

    def leftovers(self) -> list[Path]:
        """Upload folders of servers other than the one running, and interrupted or orphaned writes."""
        live = f"tunerun-upload-{self.server.process.pid}-"
        return [f for f in self.upload_folders() if not f.name.startswith(live)] + self.partials() + self.orphans()

    def wait_until_clean(self) -> None:
        """The new server removes its predecessors' leftovers just after it starts."""
        deadline = time.monotonic() + WAIT_S
        while self.leftovers():
            assert time.monotonic() < deadline, f"left after {WAIT_S} s: {self.leftovers()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def started(tmp_path_factory, free_port, tunerun):
    root = tmp_path_factory.mktemp("serve-faults")
    stub_catalog(root)
    (root / "tmp").mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(root / "tmp"), "TUNERUN_CACHE": str(root / "cache")}
    with umask(0):
        made = tunerun("serve", "keys", "create", "acme", "--config", "server.yaml", cwd=root, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    faults = Faulty(root, Server(root, free_port(), env), made.stdout.strip())
    faults.start()
    yield faults
    faults.server.stop()


@pytest.fixture
def faulty(started):
    """The module's server, started again if a failed test left it stopped."""
    if started.server.process.poll() is not None:
        started.start()
    return started


def test_a_server_killed_while_copying_an_upload_leaves_nothing_after_the_next_start(faulty, tmp_path):
    big = write_records(tmp_path / "big.jsonl", 120_000, "big")  # about 50 MB
    size = big.stat().st_size
    for attempt in range(3):  # the copy into the storage takes a fraction of a second: catch it
        sender = faulty.upload_in_background(big)
        while sender.is_alive() and not faulty.copying(size):
            time.sleep(0.002)
        if faulty.copying(size):
            break
        sender.join()
        faulty.delete(sender.answer["id"])  # missed: not a file for the next tests to wait on
    else:
        pytest.fail("three uploads of 50 MB went by without a write into the storage in progress being seen")
    faulty.server.kill()
    sender.join()
    assert faulty.upload_folders() and faulty.leftovers()  # the upload's copy, and a partial write

    faulty.start()
    faulty.wait_until_clean()
    assert faulty.upload_folders() == []


def test_a_server_killed_while_validating_validates_again_after_the_next_start(faulty, tmp_path):
    found = faulty.upload(write_records(tmp_path / "tickets.jsonl", 8_000, "validated"))
    time.sleep(0.5)
    assert faulty.status(found["id"])["status"] == "uploaded" and faulty.upload_folders()
    faulty.server.kill()
    orphan = faulty.files / f"file-{'0' * 24}.jsonl"  # bytes whose file object a crash never let be written
    orphan.write_text(json.dumps({"text": "hi"}) + "\n")
    os.utime(orphan, (time.time() - 120, time.time() - 120))

    faulty.start()
    faulty.wait_until_clean()
    done = faulty.settled(found["id"])
    assert done["status"] == "processed" and done["tunerun"]["records"] == 8_000, done
    assert not orphan.exists()


def test_sigterm_with_validations_queued_leaves_no_upload_folder(faulty, tmp_path):
    queued = [faulty.upload(write_records(tmp_path / f"queued-{n}.jsonl", 3_000, f"queued {n}"))["id"]
              for n in range(3)]
    assert len(faulty.upload_folders()) >= 2  # one validating, the others waiting
    faulty.server.stop()
    assert faulty.upload_folders() == []

    faulty.start()  # what the stop cancelled is validated now
    assert [faulty.settled(file_id)["status"] for file_id in queued] == ["processed"] * 3
    deadline = time.monotonic() + WAIT_S
    while faulty.upload_folders():
        assert time.monotonic() < deadline, faulty.upload_folders()
        time.sleep(0.2)


def test_the_services_files_are_private_under_umask_0(faulty, tmp_path):
    found = faulty.settled(faulty.upload(write_records(tmp_path / "small.jsonl", 50, "small"))["id"])
    assert found["status"] == "processed"
    service = faulty.storage / "_service"
    assert (service / "session-secret").is_file() and list(service.rglob("*.jsonl"))
    modes = {str(p.relative_to(faulty.storage)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in (service, *service.rglob("*"))}
    assert modes == {path: "0o700" if (faulty.storage / path).is_dir() else "0o600" for path in modes}
