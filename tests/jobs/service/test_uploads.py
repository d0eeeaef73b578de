"""Uploads that go wrong: records no parser should recurse into, a validation that raises, a server stopped with
validations queued, and what a crashed server left behind.

Every upload ends ``processed`` or ``error`` (a file left ``uploaded`` refuses every job on it as
``file_not_ready``, forever), and no upload leaves a copy of a user's data behind on disk. The app runs in this
process (no training); its background validator runs for real. The same faults against the real server process,
killed with SIGKILL, are in tests/e2e/test_serve_faults.py.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from service_calls import client, write_lines

from tunerun.jobs.service import files
from tunerun.jobs.service.files import FileStore, Validator, upload_folder
from tunerun.trainer.data.read import read_records

DEEP = '{"a":' + "[" * 50000 + "]" * 50000 + "}"  # under the fixture's upload limit; Python's parser stops at ~1000
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def settled(app, project: str, file_id: str, timeout: float = 30):
    """The file object once the app's own background validation is done with it."""
    deadline = time.monotonic() + timeout
    while (found := app.state.service.files.get(project, file_id)).status == "uploaded":
        assert time.monotonic() < deadline, f"{file_id} is still 'uploaded' after {timeout} s"
        time.sleep(0.05)
    return found


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ── records nested too deeply ───────────────────────────────────────────────────────────────────────────────

def test_the_reader_yields_a_deeply_nested_line_as_a_malformed_record(tmp_path):
    rows = list(read_records([write_lines(tmp_path / "deep.jsonl", [GOOD] * 3 + [DEEP, GOOD])]))
    assert [where.rsplit(":", 1)[1] for where, _, _ in rows] == ["1", "2", "3", "4", "5"]
    assert [error is None for _, _, error in rows] == [True, True, True, False, True]
    assert "nested too deeply" in rows[3][2]


def test_a_deeply_nested_line_fails_validation_naming_it(app, keys, tmp_path):
    found = client(app, keys["acme"]).files.create(file=write_lines(tmp_path / "deep.jsonl", [GOOD] * 3 + [DEEP])
                                                   .open("rb"), purpose="fine-tune")
    assert found.status == "uploaded"
    done = settled(app, "acme", found.id)
    assert done.status == "error" and "line 4: nested too deeply" in done.status_details


def test_a_deeply_nested_first_line_is_refused_at_once(app, keys, tmp_path):
    with pytest.raises(openai.BadRequestError) as refused:
        client(app, keys["acme"]).files.create(file=("deep.jsonl", (DEEP + "\n").encode()), purpose="fine-tune")
    assert "nested too deeply" in refused.value.body["message"] and refused.value.body["param"] == "file"
    assert app.state.service.files.list("acme") == []


# ── a validation that raises ────────────────────────────────────────────────────────────────────────────────

def test_a_validation_that_raises_is_logged_and_recorded_as_error(app, keys, tmp_path, monkeypatch, caplog):
    def broken(path, filename):
        raise RuntimeError("a bug in a reader")

    monkeypatch.setattr(files, "validation_verdict", broken)
    caplog.set_level(logging.ERROR, logger="tunerun.serve")
    found = client(app, keys["acme"]).files.create(file=write_lines(tmp_path / "ok.jsonl", [GOOD] * 3).open("rb"),
                                                   purpose="fine-tune")
    done = settled(app, "acme", found.id)
    assert done.status == "error" and "could not be validated" in done.status_details
    assert "a bug in a reader" not in done.status_details  # the server's internals are for its log
    logged = [r for r in caplog.records if r.name == "tunerun.serve" and found.id in r.getMessage()]
    assert logged and logged[0].exc_info and "a bug in a reader" in str(logged[0].exc_info[1])


# ── upload folders ──────────────────────────────────────────────────────────────────────────────────────────

def test_shutdown_removes_every_upload_folder_it_holds_and_records_no_verdict(app, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reading, release, read = threading.Event(), threading.Event(), files.validation_verdict

    def slow(path, filename):
        reading.set()
        release.wait(30)
        return read(path, filename)

    monkeypatch.setattr(files, "validation_verdict", slow)
    store, validator = app.state.service.files, app.state.service.validator
    ids = []
    for _ in range(3):
        local = write_lines(upload_folder() / "data.jsonl", [GOOD])
        ids.append(store.add("acme", "ok.jsonl", "fine-tune", local).id)
        validator.later("acme", ids[-1], local)
    assert reading.wait(30)  # the first is being read, two wait their turn
    validator.shutdown()
    assert list(tmp_path.glob("tunerun-upload-*")) == []
    release.set()
    validator.pool.shutdown(wait=True)
    # the one being read lost its copy: it records nothing, and the next start validates all three again
    assert [store.get("acme", file_id).status for file_id in ids] == ["uploaded"] * 3


def test_a_restarted_server_removes_what_a_crashed_one_left(served, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    crashed = tmp_path / "tmp" / f"tunerun-upload-{dead_pid()}-k2j4"  # a dead server's copy of an upload
    crashed.mkdir()
    (crashed / "data.jsonl").write_text(GOOD)
    live, unrelated = upload_folder(), tmp_path / "tmp" / "tunerun-upload-made-by-hand"
    unrelated.mkdir()
    store = FileStore(served.config.storage)
    whole = store.add("acme", "ok.jsonl", "fine-tune", write_lines(tmp_path / "ok.jsonl", [GOOD]))
    store.validate("acme", whole.id, tmp_path / "ok.jsonl")
    project = Path(served.config.storage.uri) / "_service" / "files" / "acme"
    old, young = project / f"file-{'a' * 24}.jsonl", project / f"file-{'b' * 24}.jsonl"
    for orphan in (old, young):  # bytes whose file object was never written
        orphan.write_text(GOOD)
    os.utime(old, (time.time() - 120, time.time() - 120))

    monkeypatch.setattr(files, "ORPHAN_AFTER_S", 3.0)  # a minute, shortened
    Validator(store).recover()
    # (the folder is the process's temp folder for now: only what this test made is asserted on)
    assert not crashed.exists() and live.is_dir() and unrelated.is_dir()
    assert sorted(p.name for p in project.iterdir()) == sorted([f"{whole.id}.json", f"{whole.id}.jsonl", young.name])
    assert live.name.startswith(f"tunerun-upload-{os.getpid()}-")
    deadline = time.monotonic() + 10  # a young orphan may be a write in progress: it goes once a minute old
    while young.exists():
        assert time.monotonic() < deadline, "the orphan that was young at start is still there"
        time.sleep(0.1)
    assert sorted(p.name for p in project.iterdir()) == sorted([f"{whole.id}.json", f"{whole.id}.jsonl"])


def test_a_recovery_that_listed_an_upload_in_validation_gives_no_second_verdict(app, keys, tmp_path):
    # A start's recovery lists every file still `uploaded`: one uploaded meanwhile is queued twice, once by the
    # upload and once by the recovery; the second turn must leave the first verdict (and later edits) alone.
    store, validator = app.state.service.files, app.state.service.validator
    found = client(app, keys["acme"]).files.create(file=write_lines(tmp_path / "ok.jsonl", [GOOD]).open("rb"),
                                                   purpose="fine-tune")
    verdict = settled(app, "acme", found.id)
    assert verdict.status == "processed" and verdict.format == "chat"
    store.save("acme", replace(verdict, format=None))  # as stored before formats were recorded
    again = store.fetch("acme", found.id, upload_folder() / "data.jsonl")
    validator.later("acme", found.id, again)  # the recovery's turn, after the upload's
    validator.pool.submit(lambda: None).result(timeout=30)  # one worker: every earlier turn is done
    assert store.get("acme", found.id) == replace(verdict, format=None)
    assert not again.parent.exists()


def test_a_recovery_that_meets_a_storage_error_is_logged_and_the_server_goes_on(app, monkeypatch, caplog):
    validator = app.state.service.validator

    def unreachable(*_):
        raise OSError("storage unreachable")

    monkeypatch.setattr(validator.files, "remove_leftovers", unreachable)
    validator.recover()  # a background thread's body: it must not raise
    assert "recovering what stopped servers left failed" in caplog.text


def test_a_file_deleted_while_it_is_validated_stays_deleted(app, tmp_path):
    store = app.state.service.files
    local = write_lines(tmp_path / "ok.jsonl", [GOOD])
    found = store.add("acme", "ok.jsonl", "fine-tune", local)
    verdict = store.examine("acme", found.id, local)  # read while the client deletes it
    store.delete("acme", found.id)
    assert store.settle("acme", verdict) is False
    assert not store.exists("acme", found.id) and store.list("acme") == []
