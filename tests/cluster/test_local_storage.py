"""The local storage backend on a real disk: what it leaves behind when a write fails or its writer dies, and who
may read what it wrote.

The storage holds the service's secrets (``_service/session-secret``, key hashes) and users' training data, often
on a shared login node: every file is 0600 and every folder it makes 0700 whatever the umask. A full disk is a
real tmpfs (the tests run as root, as CI does; elsewhere those tests skip and say why); a writer that dies is a
real process killed with SIGKILL between writing its bytes and renaming them into place.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tunerun.cluster.storage import LocalBackend

# A writer stopped after its bytes are written and before they are renamed into place: the moment a crash or a
# kill -9 leaves an interrupted write behind.
STOPPED_WRITER = """
import os, sys, time
from tunerun.cluster.storage import LocalBackend
def stop(*args):
    print("written", flush=True)
    time.sleep(600)
os.replace = stop
LocalBackend(sys.argv[1]).put(sys.argv[2], b"{}")
"""


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_is_0600_and_every_folder_it_makes_0700_whatever_the_umask(tmp_path):
    shared = tmp_path / "store" / "shared"
    shared.mkdir(parents=True)
    shared.chmod(0o755)  # made by someone else: not the backend's to change
    parent_mode = mode(tmp_path)
    source = tmp_path / "upload.jsonl"
    source.write_bytes(b'{"text": "x"}\n')
    backend = LocalBackend(tmp_path / "store" / "root")
    with umask(0):
        backend.put("_service/keys.json", b"{}")
        assert backend.put_new("_service/session-secret", b"s" * 64) is True
        backend.upload_file(source, "_service/files/acme/file-1.jsonl")
        backend.append("run-1/events.jsonl", b"{}\n")
        backend.append("run-1/events.jsonl", b"{}\n")
        backend.download_file("_service/keys.json", tmp_path / "scratch" / "a" / "keys.json")
        LocalBackend(tmp_path / "store").put("shared/x.json", b"{}")
    written = [p for p in (tmp_path / "store").rglob("*") if p.is_file()] + [tmp_path / "scratch/a/keys.json"]
    assert {p.name: oct(mode(p)) for p in written} == {
        "keys.json": "0o600", "session-secret": "0o600", "file-1.jsonl": "0o600", "events.jsonl": "0o600",
        "x.json": "0o600"}
    assert len(written) == 6  # nothing else, no temp file left
    made = [p for p in (tmp_path / "store" / "root").rglob("*") if p.is_dir()]
    made += [tmp_path / "store" / "root", tmp_path / "scratch", tmp_path / "scratch" / "a"]
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in made} == {
        str(p.relative_to(tmp_path)): "0o700" for p in made}
    assert (mode(shared), mode(tmp_path / "store"), mode(tmp_path)) == (0o755, 0o755, parent_mode)
    assert (backend.get("run-1/events.jsonl"), backend.get("_service/session-secret")) == (b"{}\n{}\n", b"s" * 64)
    assert backend.put_new("_service/session-secret", b"t" * 64) is False  # the first writer's stays
    assert backend.get("_service/session-secret") == b"s" * 64


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """A 1 MiB tmpfs, mounted for the test."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        yield disk

def fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with ballast.open("ab", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return ballast


def test_a_full_disk_leaves_no_partial_or_empty_file(small_disk, tmp_path):
    backend = LocalBackend(small_disk / "store")
    backend.put("_service/keys.json", b"{}")
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(b'{"text": "x"}\n' * (200 << 10))  # about 3 MiB: more than the disk holds
    with pytest.raises(OSError) as full:
        backend.upload_file(upload, "_service/files/acme/file-1.jsonl")
    assert full.value.errno == errno.ENOSPC
    ballast = fill(small_disk)
    with pytest.raises(OSError) as full:
        backend.put_new("_service/session-secret", b"s" * 64)
    assert full.value.errno == errno.ENOSPC
    assert sorted(backend.list("")) == ["_service/keys.json"]  # no partial upload, no empty secret
    ballast.unlink()
    assert backend.put_new("_service/session-secret", b"s" * 64) is True  # nothing half-made stands in the way
    assert backend.get("_service/session-secret") == b"s" * 64


def stopped_writer(root: Path, key: str) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", STOPPED_WRITER, str(root), key], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    assert writer.stdout.readline().strip() == "written"
    return writer


def test_interrupted_writes_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    backend = LocalBackend(tmp_path / "store")
    backend.put("_service/files/acme/file-1.json", b"{}")
    dead = stopped_writer(backend.root, "_service/files/acme/file-2.jsonl")
    live = stopped_writer(backend.root, "_service/files/acme/file-3.jsonl")
    try:
        dead.kill()
        dead.wait()
        on_disk = lambda: sorted(p.name for p in (backend.root / "_service/files/acme").iterdir())  # noqa: E731
        assert len(on_disk()) == 3  # the whole file and two interrupted writes
        assert list(backend.list("_service")) == ["_service/files/acme/file-1.json"] == \
            [f"_service/files/acme/{name}" for name in backend.children("_service/files/acme")]
        removed = backend.remove_interrupted_writes("_service")
        assert len(removed) == 1 and removed[0].startswith(f"_service/files/acme/.file-2.jsonl.{dead.pid}@")
        assert len(on_disk()) == 2 and on_disk()[0].startswith(f".file-3.jsonl.{live.pid}@")
        # written on another host (storage shared between machines): its pid says nothing here, only its age does
        monkeypatch.setattr(socket, "gethostname", lambda: "another-host")
        assert backend.remove_interrupted_writes("_service") == []
        partial = backend.root / "_service/files/acme" / on_disk()[0]
        two_hours_ago = time.time() - 2 * 3600
        os.utime(partial, (two_hours_ago, two_hours_ago))
        assert backend.remove_interrupted_writes("_service") == [str(partial.relative_to(backend.root))]
    finally:
        live.kill()
        live.wait()
    assert on_disk() == ["file-1.json"]
