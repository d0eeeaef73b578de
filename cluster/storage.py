"""The run folder: one prefix per run that holds everything a run produces (the ledger).

``status``, ``list``, ``logs`` and the workers all go through `RunFolder`, so they behave the same whatever
target ran the job. Only local folders exist so far; an S3 implementation arrives behind the same methods.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tunerun.jobs.errors import RunNotFound, StorageError

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class RunFolder:
    """Files of one run, addressed by their name relative to ``<storage>/<run-id>/``."""

    def __init__(self, root: str | Path, run_id: str):
        if "://" in str(root):
            raise StorageError(f"storage {root}: only local folders are supported so far")
        self.root = Path(root)
        self.run_id = run_id
        self.path = self.root / run_id

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str = "") -> bool:
        return self.file(name).exists()

    def write_text(self, name: str, text: str) -> None:
        """Atomic: readers (a following CLI, a restarted worker) never see half a file."""
        target = self.file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)

    def read_text(self, name: str) -> str:
        try:
            return self.file(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StorageError(f"{self.file(name)} does not exist") from None

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        return json.loads(self.read_text(name))

    def append_jsonl(self, name: str, record: dict) -> None:
        target = self.file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read_jsonl(self, name: str) -> list[dict]:
        if not self.exists(name):
            return []
        records = []
        for line in self.file(name).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line still being written by another process
        return records

    def list_dir(self, name: str) -> list[str]:
        folder = self.file(name)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def update_run_info(self, **fields) -> dict:
        """Merge fields into run.json (single writer: the driver of the run)."""
        info = self.read_json("run.json") if self.exists("run.json") else {}
        info.update(fields)
        info["updated_at"] = time.time()
        self.write_json("run.json", info)
        return info

    def event(self, kind: str, **fields) -> None:
        self.append_jsonl("events.jsonl", {"time": time.time(), "event": kind, **fields})


class RunStore:
    """All runs under one storage location."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def open(self, run_id: str) -> RunFolder:
        run = RunFolder(self.root, run_id)
        if not run.exists("run.json"):
            known = ", ".join(self.run_ids()[-5:]) or "none"
            raise RunNotFound(f"no run '{run_id}' in {self.root} (recent runs: {known}); "
                              "pass --storage if the run lives elsewhere")
        return run

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "run.json").is_file())

    def runs(self) -> Iterator[RunFolder]:
        for run_id in self.run_ids():
            yield RunFolder(self.root, run_id)
