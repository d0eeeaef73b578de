"""The run folder: one prefix per run that holds everything a run produces (the ledger).

``status``, ``list``, ``logs``, the driver and the workers all go through `RunFolder`, so they behave the same
whatever target ran the job and wherever the folder lives: a local path or ``s3://bucket/prefix`` on an
S3-compatible store (see `tunerun.cluster.s3`). Names inside a run are relative keys such as
``checkpoints/step-000020/manifest.json``. What ``run.json`` holds and who writes it: `tunerun.cluster.runs`.

A local storage is often a folder on a shared login node, and it holds the service's secrets (the session
secret, key hashes) and users' training data: `LocalBackend` makes every file 0600 and every folder 0700 itself,
whatever the umask of the process that writes. Nothing it writes is ever seen half-written, and a write that
fails (a full disk) or whose writer dies (kill -9, a crash) leaves only a temp file that names its writer, so the
next start can tell it from a write still in progress and remove it (`LocalBackend.remove_interrupted_writes`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tunerun.jobs.errors import RunNotFound, StorageError
from tunerun.jobs.spec import StorageSpec

FILE_MODE, FOLDER_MODE = 0o600, 0o700
# A write in progress lies beside its target as ``.<name>.<pid>@<host>.<random>.part`` until it is renamed into
# place: the writer's pid and host say whether anyone can still finish it.
PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>.+)\.[a-z0-9_]+\.part")
# Another host's pid says nothing here: its write is abandoned once untouched this long (a live copy writes on).
ABANDONED_AFTER_S = 3600


class LocalBackend:
    """Keys are paths below ``root``; writes land whole (temp file + rename, or link), appends use O_APPEND;
    files are 0600, the folders it makes 0700."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def local_path(self, key: str = "") -> Path:
        return self.root / key

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        _write_whole(self.root / key, lambda partial: partial.write_bytes(data), os.replace)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if nothing is there (an exclusive create); whether it did. The bytes are written
        beside it and hard-linked into place (a link, unlike a rename, refuses an existing name), so a concurrent
        reader never finds the file empty, and a write that fails leaves nothing to refuse the next try."""
        try:
            _write_whole(self.root / key, lambda partial: partial.write_bytes(data), os.link)
        except FileExistsError:
            return False
        return True

    def append(self, key: str, data: bytes) -> None:
        target = self.root / key
        _make_folders(target.parent)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode passes through the umask
        except FileExistsError:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "ab") as handle:
            handle.write(data)

    def flush(self) -> None:
        return None

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def list(self, prefix: str) -> dict[str, int]:
        """Every file below ``prefix`` (recursive), as key → size; writes not yet in place are no files."""
        base = self.root / prefix
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not PARTIAL.fullmatch(p.name)}

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if not PARTIAL.fullmatch(p.name)) if base.is_dir() else []

    def upload_file(self, path: Path, key: str) -> None:
        target = self.root / key
        if Path(path).resolve() != target.resolve():
            _write_whole(target, lambda partial: shutil.copyfile(path, partial), os.replace)

    def download_file(self, key: str, path: Path) -> None:
        _write_whole(Path(path), lambda partial: shutil.copyfile(self.root / key, partial), os.replace)

    def delete_prefix(self, prefix: str) -> None:
        target = self.root / prefix
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def remove_interrupted_writes(self, prefix: str) -> list[str]:
        """Remove the temp files below ``prefix`` of writes nobody will finish: their writer died on this host
        (a crash, a kill -9), or, written from another host, they have been untouched for an hour. The temp
        files' keys."""
        host, removed = socket.gethostname(), []
        for path in (self.root / prefix).rglob(".*.part"):
            found = PARTIAL.fullmatch(path.name)
            if found and _abandoned(path, int(found["pid"]), found["host"] == host):
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(self.root)))
        return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs on this host (it may belong to another user). A finished child that
    nobody reaped yet is a zombie: not alive for anyone asking whether its work can still finish."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (not Linux): the signal said it exists


def _abandoned(partial: Path, pid: int, this_host: bool) -> bool:
    try:
        idle_s = time.time() - partial.stat().st_mtime
    except FileNotFoundError:
        return False  # renamed into place meanwhile
    return (this_host and not process_alive(pid)) or idle_s > ABANDONED_AFTER_S


def _make_folders(folder: Path) -> None:
    """``folder`` and its missing parents, each 0700. ``mkdir(parents=True, mode=…)`` would give the parents the
    umask's mode and the last one the mode less the umask; folders already there are not ours to change."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            continue  # another writer made it first
        made.chmod(FOLDER_MODE)


def _write_whole(target: Path, fill: Callable[[Path], object], place: Callable[[Path, Path], None]) -> None:
    """``fill`` a 0600 temp file beside ``target`` (writing into it keeps its mode) and ``place`` it there
    (rename or link). The temp file is gone afterwards whatever happened: a full disk must not keep the space,
    nor the folder a partial file."""
    _make_folders(target.parent)
    fd, name = tempfile.mkstemp(dir=target.parent, suffix=".part",
                                prefix=f".{target.name}.{os.getpid()}@{socket.gethostname()}.")
    partial = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 passes through the umask too
        os.close(fd)
        fill(partial)
        place(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # after a rename: already gone; after a link: the second name


def backend_for(storage: StorageSpec | str):
    spec = StorageSpec(uri=storage) if isinstance(storage, str) else storage
    if spec.is_s3:
        from tunerun.cluster.s3 import S3Backend

        return S3Backend(spec)
    return LocalBackend(spec.uri)


class RunFolder:
    """Files of one run, addressed by their name relative to ``<storage>/<run-id>/``."""

    def __init__(self, storage: StorageSpec | str, run_id: str):
        self.storage = StorageSpec(uri=storage) if isinstance(storage, str) else storage
        self.backend = backend_for(self.storage)
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"RunFolder({self.uri()!r})"

    def _key(self, name: str) -> str:
        return f"{self.run_id}/{name}" if name else self.run_id

    def uri(self, name: str = "") -> str:
        return self.backend.uri(self._key(name))

    @property
    def is_local(self) -> bool:
        return isinstance(self.backend, LocalBackend)

    def local_path(self, name: str = "") -> Path:
        """The on-disk path of ``name``; only for run folders on a local (or shared) filesystem."""
        if not self.is_local:
            raise StorageError(f"{self.uri(name)} is not on a local filesystem")
        return self.backend.local_path(self._key(name))

    def exists(self, name: str = "") -> bool:
        return self.backend.exists(self._key(name))

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.backend.get(self._key(name))
        except FileNotFoundError:
            raise StorageError(f"{self.uri(name)} does not exist") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        """Atomic on every backend: readers (a following CLI, a restarted worker) never see half a file."""
        self.backend.put(self._key(name), text.encode("utf-8"))

    def claim(self, name: str, obj) -> bool:
        """Write ``name`` only if no one has (an exclusive create on disk, a conditional write on S3): of several
        processes claiming the same name, exactly one gets True."""
        return self.backend.put_new(self._key(name), (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        return json.loads(self.read_text(name))

    def append_jsonl(self, name: str, record: dict) -> None:
        self.backend.append(self._key(name), (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def flush(self) -> None:
        """Push buffered appends (object stores have no append; see S3Backend)."""
        self.backend.flush()

    def read_jsonl(self, name: str) -> list[dict]:
        if not self.exists(name):
            return []
        records = []
        for line in self.read_text(name).splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written by another process
        return records

    def list_dir(self, name: str) -> list[str]:
        return self.backend.children(self._key(name))

    def list_files(self, name: str) -> dict[str, int]:
        """Files below ``name`` as {path relative to name: size}."""
        prefix = self._key(name).rstrip("/") + "/"
        return {key[len(prefix):]: size for key, size in self.backend.list(self._key(name)).items()
                if key.startswith(prefix)}

    def upload_dir(self, local: Path, name: str) -> None:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.backend.upload_file(path, self._key(f"{name}/{path.relative_to(local)}"))

    def upload(self, local: Path, name: str) -> None:
        self.backend.upload_file(Path(local), self._key(name))

    def download(self, name: str, local: Path) -> Path:
        self.backend.download_file(self._key(name), Path(local))
        return Path(local)

    def download_dir(self, name: str, local: Path) -> Path:
        for relative in self.list_files(name):
            self.backend.download_file(self._key(f"{name}/{relative}"), Path(local) / relative)
        return Path(local)

    def delete(self, name: str) -> None:
        self.backend.delete_prefix(self._key(name))

    def event(self, kind: str, **fields) -> None:
        self.append_jsonl("events.jsonl", {"time": time.time(), "event": kind, **fields})


class RunStore:
    """All runs under one storage location."""

    def __init__(self, storage: StorageSpec | str):
        self.storage = StorageSpec(uri=storage) if isinstance(storage, str) else storage
        self.backend = backend_for(self.storage)

    def open(self, run_id: str) -> RunFolder:
        run = RunFolder(self.storage, run_id)
        if not run.exists("run.json"):
            known = ", ".join(self.run_ids()[-5:]) or "none"
            raise RunNotFound(f"no run '{run_id}' in {self.storage.uri} (recent runs: {known}); "
                              "pass --storage if the run lives elsewhere")
        return run

    def run_ids(self) -> list[str]:
        return [name for name in self.backend.children("") if self.backend.exists(f"{name}/run.json")]

    def runs(self) -> Iterator[RunFolder]:
        for run_id in self.run_ids():
            yield RunFolder(self.storage, run_id)
