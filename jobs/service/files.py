"""Uploaded files (OpenAI's Files API, purpose ``fine-tune``), kept per project in the storage.

``<storage>/_service/files/<project>/<file-id>.jsonl`` holds the bytes, ``<file-id>.json`` the file object; the
object is written after the bytes, so a file exists only once it is whole. An upload arrives on a local
temporary file (streamed by the multipart parser, never held in memory), gets the quick checks a client should
hear about at once (a plain ``.jsonl`` name, not empty, JSON lines), is stored as ``uploaded``, and is then read
record by record with tunerun's own data reader: ``processed`` (malformed records below the allowed share are
listed in ``status_details``, as the data report lists them) or ``error``, naming the lines at fault.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import DataError
from tunerun.jobs.service.errors import bad_request, not_found
from tunerun.jobs.spec import CleanSpec, StorageSpec

ROOT = "_service/files"
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,199}")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
LISTED_PROBLEMS = 20


@dataclass
class FileObject:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str  # uploaded → processed | error
    status_details: str | None = None
    object: str = "file"
    records: int | None = None
    cleaning: dict | None = None  # what the default cleaning does to it (`count_cleaning`), once processed

    def public(self) -> dict:
        shown = {k: v for k, v in asdict(self).items() if k not in ("records", "cleaning")}
        return shown | {"tunerun": {"records": self.records, "cleaning": self.cleaning}}


class FileStore:
    def __init__(self, storage: StorageSpec):
        self.storage = storage
        self.backend = backend_for(storage)

    def _key(self, project: str, file_id: str, suffix: str) -> str:
        return f"{ROOT}/{project}/{file_id}.{suffix}"

    def projects(self) -> list[str]:
        return self.backend.children(ROOT)

    def fetch(self, project: str, file_id: str, local: Path) -> Path:
        """A local copy of the file's bytes (for validating it again)."""
        self.backend.download_file(self._key(project, file_id, "jsonl"), local)
        return local

    def data_uri(self, project: str, file_id: str) -> str:
        """Where the trainer reads the file from (a local path or an s3:// URI)."""
        return self.backend.uri(self._key(project, file_id, "jsonl"))

    # ── writing ─────────────────────────────────────────────────────────────────────────────────────────────

    def add(self, project: str, filename: str, purpose: str, upload: Path) -> FileObject:
        """Check ``upload`` (a local temporary file) the quick way and store it as ``uploaded``."""
        check_upload(filename, purpose, upload)
        file_id = f"file-{secrets.token_hex(12)}"
        self.backend.upload_file(upload, self._key(project, file_id, "jsonl"))
        found = FileObject(id=file_id, bytes=upload.stat().st_size, created_at=int(time.time()), filename=filename,
                           purpose=purpose, status="uploaded")
        self._save(project, found)
        return found

    def validate(self, project: str, file_id: str, local: Path) -> FileObject:
        """Read every record with tunerun's data reader; the file object says how that went."""
        status, details, records = validation_verdict(local, self.get(project, file_id).filename)
        found = FileObject(**{**asdict(self.get(project, file_id)), "status": status, "status_details": details,
                              "records": records, "cleaning": cleaning_counts(local) if status == "processed"
                              else None})
        self._save(project, found)
        return found

    def _save(self, project: str, found: FileObject) -> None:
        self.backend.put(self._key(project, found.id, "json"), json.dumps(asdict(found)).encode("utf-8"))

    def delete(self, project: str, file_id: str) -> None:
        self.get(project, file_id)
        self.backend.delete_prefix(self._key(project, file_id, "json"))  # the object first: half a file never shows
        self.backend.delete_prefix(self._key(project, file_id, "jsonl"))

    # ── reading ─────────────────────────────────────────────────────────────────────────────────────────────

    def get(self, project: str, file_id: str) -> FileObject:
        key = self._key(project, file_id, "json")
        if not FILE_ID.fullmatch(file_id or "") or not self.backend.exists(key):
            raise not_found("file", file_id, "file_id")
        return FileObject(**json.loads(self.backend.get(key)))

    def content(self, project: str, file_id: str) -> bytes:
        self.get(project, file_id)
        return self.backend.get(self._key(project, file_id, "jsonl"))

    def list(self, project: str) -> list[FileObject]:
        names = [n for n in self.backend.children(f"{ROOT}/{project}") if n.endswith(".json")]
        found = [self.get(project, n.removesuffix(".json")) for n in names]
        return sorted(found, key=lambda f: f.created_at, reverse=True)


class Validator:
    """Validates uploads one at a time in the background, from a local copy it removes when done."""

    def __init__(self, files: FileStore):
        self.files = files
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunerun-validate")

    def later(self, project: str, file_id: str, local: Path) -> None:
        def run():
            try:
                self.files.validate(project, file_id, local)
            finally:
                shutil.rmtree(local.parent, ignore_errors=True)

        self.pool.submit(run)

    def revalidate_unfinished(self) -> None:
        """Uploads whose validation a stopped server never finished are read again (from storage)."""
        for project in self.files.projects():
            for found in self.files.list(project):
                if found.status == "uploaded":
                    local = Path(tempfile.mkdtemp(prefix="tunerun-upload-")) / "data.jsonl"
                    self.later(project, found.id, self.files.fetch(project, found.id, local))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def check_upload(filename: str, purpose: str, upload: Path) -> None:
    """What can be told at once: purpose, a plain file name, some bytes, and JSON objects on lines."""
    if purpose != "fine-tune":
        raise bad_request(f"purpose {purpose!r} is not served here; this server keeps files for purpose 'fine-tune'",
                          "purpose")
    if not FILENAME.fullmatch(filename or "") or ".." in filename:
        raise bad_request(f"filename {filename!r}: give a plain file name (letters, digits, '.', '_', '-', spaces; "
                          "no folders), e.g. tickets.jsonl", "file")
    if not filename.lower().endswith(".jsonl"):
        raise bad_request(f"{filename}: fine-tuning files are JSONL (one JSON object per line, named *.jsonl)",
                          "file")
    if upload.stat().st_size == 0:
        raise bad_request(f"{filename} is empty: it needs at least one training record", "file")
    first = _first_line(upload)
    try:
        if not isinstance(json.loads(first), dict):
            raise ValueError
    except ValueError:
        raise bad_request(f"{filename} is not JSONL: its first line is not a JSON object ({first[:80]!r}); write "
                          'one record per line, e.g. {"messages": [...]}', "file") from None


def _first_line(path: Path) -> str:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                return raw.decode("utf-8", errors="replace").strip()
    return ""


def cleaning_counts(path: Path) -> dict:
    """The cleaning steps' counts under the default cleaning settings (a catalog model's spec may clean
    differently; its job's data report is the word on what trained)."""
    from tunerun.trainer.data.pipeline import count_cleaning

    report = count_cleaning(path, CleanSpec())
    counts = {name: getattr(report, name) for name in ("records_read", "malformed", "empty", "duplicates",
                                                       "near_duplicates", "fuzzy_duplicates")}
    return counts | {"kept": report.train_records, "pii_masked": report.pii_masked}


def validation_verdict(path: Path, filename: str) -> tuple[str, str | None, int]:
    """(status, status_details, records read) of a JSONL file read as a training run reads it."""
    from tunerun.trainer.data.formats import detect_format, to_conversation
    from tunerun.trainer.data.read import read_records

    total, bad = 0, []
    try:
        for where, record, error in read_records([path]):
            total += 1
            if error is None:
                try:
                    to_conversation(record, detect_format(record))
                except DataError as exc:
                    error = str(exc)
            if error is not None:
                bad.append(f"line {where.rsplit(':', 1)[-1]}: {error}")
    except DataError as exc:
        return "error", str(exc).replace(str(path), filename), total
    if total == 0:
        return "error", f"{filename} holds no records", 0
    allowed = CleanSpec().max_bad_fraction
    listed = "; ".join(bad[:LISTED_PROBLEMS]) + (f"; … {len(bad) - LISTED_PROBLEMS} more" if len(bad) > LISTED_PROBLEMS
                                                 else "")
    if bad and len(bad) / total > allowed:
        return "error", (f"{len(bad)} of {total} records cannot be used (more than {allowed:.0%}): {listed}"), total
    if bad:
        return "processed", f"{total} records; {len(bad)} malformed ones will be skipped: {listed}", total
    return "processed", None, total
