"""The run folder: one prefix per run that holds everything a run produces (the ledger).

``status``, ``list``, ``logs``, the driver and the workers all go through `RunFolder`, so they behave the same
whatever target ran the job and wherever the folder lives: a local path or ``s3://bucket/prefix`` on an
S3-compatible store (see `tunerun.cluster.s3`). Names inside a run are relative keys such as
``checkpoints/step-000020/manifest.json``. What ``run.json`` holds and who writes it: `tunerun.cluster.runs`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tunerun.jobs.errors import RunNotFound, StorageError
from tunerun.jobs.spec import StorageSpec

class LocalBackend:
    """Keys are paths below ``root``; writes are atomic (temp file + rename), appends use O_APPEND."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def local_path(self, key: str = "") -> Path:
        return self.root / key

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:  # a full disk: leave no half-written temp file behind to hold the space
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if nothing is there (an exclusive create); whether it did."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def append(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as handle:
            handle.write(data)

    def flush(self) -> None:
        return None

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def list(self, prefix: str) -> dict[str, int]:
        """Every file below ``prefix`` (recursive), as key → size."""
        base = self.root / prefix
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def upload_file(self, path: Path, key: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(path).resolve() != target.resolve():
            shutil.copyfile(path, target)

    def download_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / key, path)

    def delete_prefix(self, prefix: str) -> None:
        target = self.root / prefix
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


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
