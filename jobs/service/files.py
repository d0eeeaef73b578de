"""Uploaded files (OpenAI's Files API, purpose ``fine-tune``), kept per project in the storage.

``<storage>/_service/files/<project>/<file-id>.jsonl`` holds the bytes, ``<file-id>.json`` the file object; the
object is written after the bytes, so a file exists only once it is whole. An upload arrives on a local
temporary file (streamed by the multipart parser, never held in memory), gets the quick checks a client should
hear about at once (a plain ``.jsonl`` name, not empty, JSON lines), is stored as ``uploaded``, and is then read
record by record with tunerun's own data reader: ``processed`` (malformed records below the allowed share are
listed in ``status_details``, as the data report lists them) or ``error``, naming the lines at fault. A processed
file records its records' format (``tunerun.format``: chat, openai_preference, …), so a job can be refused at once
when its method trains on another kind of record.

Every upload ends ``processed`` or ``error``: one left ``uploaded`` would refuse every job on it as
``file_not_ready``, forever. So a validation that raises (a bug, a record the reader chokes on) is logged and
recorded as ``error``, and uploads a stopped server never finished are validated again at the next start.

An upload's local copy is a user's training data in the machine's temp folder: it lives in an upload folder
(`upload_folder`) that the `Validator` removes when the validation ends or is cancelled. A server killed outright
(kill -9, out of memory) cannot, so its folders carry its pid, and the next server's start (`Validator.recover`)
removes those of dead servers, with the storage's interrupted writes and bytes whose file object never came.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from tunerun.cluster.storage import LocalBackend, backend_for, process_alive
from tunerun.jobs.errors import DataError
from tunerun.jobs.service.errors import bad_request, not_found
from tunerun.jobs.spec import CleanSpec, StorageSpec
from tunerun.trainer.data.formats import PREFERENCE_FORMATS
from tunerun.trainer.data.read import TOO_DEEP, too_deep

ROOT = "_service/files"
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,199}")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
LISTED_PROBLEMS = 20
UPLOAD_PREFIX = "tunerun-upload-"
UPLOAD_FOLDER = re.compile(re.escape(UPLOAD_PREFIX) + r"(\d+)-.+")  # the pid of the server that holds it
ORPHAN_AFTER_S = 60  # the file object follows its bytes at once: bytes alone for a minute lost their writer
logger = logging.getLogger("tunerun.serve")


def upload_folder() -> Path:
    """A new private temp folder for one upload's local copy, named after this server's pid."""
    return Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-"))


def remove_dead_upload_folders() -> int:
    """Remove the upload folders of servers that no longer run (killed before they could); how many."""
    dead = [folder for folder in Path(tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*")
            if (owner := UPLOAD_FOLDER.fullmatch(folder.name)) and not process_alive(int(owner[1]))]
    for folder in dead:
        shutil.rmtree(folder, ignore_errors=True)
    return len(dead)


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
    # Its records' format (`tunerun.trainer.data.formats`), once processed; None in objects stored before formats
    # were recorded (a job on such a file learns of a mismatch when its data is prepared).
    format: str | None = None

    def public(self) -> dict:
        shown = {k: v for k, v in asdict(self).items() if k not in ("records", "cleaning", "format")}
        # preference_pairs: which method the file is for (the dashboard picks dpo for pairs); None: not known
        pairs = self.format in PREFERENCE_FORMATS if self.format else None
        return shown | {"tunerun": {"records": self.records, "cleaning": self.cleaning, "format": self.format,
                                    "preference_pairs": pairs}}


class FileStore:
    def __init__(self, storage: StorageSpec):
        self.storage = storage
        self.backend = backend_for(storage)
        # A verdict saved while the file is being deleted would bring its object back: the two take turns.
        self._settling = threading.Lock()

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
        self.save(project, found)
        return found

    def validate(self, project: str, file_id: str, local: Path) -> FileObject:
        """Read every record with tunerun's data reader; the file object says how that went."""
        found = self.examine(project, file_id, local)
        self.settle(project, found)
        return found

    def examine(self, project: str, file_id: str, local: Path) -> FileObject:
        """The file object as reading every record of ``local`` leaves it, not saved yet."""
        verdict = validation_verdict(local, self.get(project, file_id).filename)
        processed = verdict.status == "processed"
        return replace(self.get(project, file_id), status=verdict.status, status_details=verdict.details,
                       records=verdict.records, cleaning=cleaning_counts(local) if processed else None,
                       format=verdict.format if processed else None)

    def save(self, project: str, found: FileObject) -> None:
        self.backend.put(self._key(project, found.id, "json"), json.dumps(asdict(found)).encode("utf-8"))

    def settle(self, project: str, found: FileObject) -> bool:
        """Save a validation's verdict unless the file was deleted while it was read; whether it was saved."""
        with self._settling:
            if not self.backend.exists(self._key(project, found.id, "json")):
                return False
            self.save(project, found)
            return True

    def delete(self, project: str, file_id: str) -> None:
        with self._settling:
            self.get(project, file_id)
            self.backend.delete_prefix(self._key(project, file_id, "json"))  # the object first: no half file shows
            self.backend.delete_prefix(self._key(project, file_id, "jsonl"))

    def remove_leftovers(self) -> list[str]:
        """Remove what servers that died mid-write left: interrupted writes, and bytes older than a minute with
        no file object (a crash between the two writes, or between a deletion's two). The keys removed."""
        if not isinstance(self.backend, LocalBackend):
            return []  # an object store keeps no partial objects; an orphan's age would need its LastModified
        removed = self.backend.remove_interrupted_writes(ROOT)
        for project in self.projects():
            orphans = [key for name in self.backend.children(f"{ROOT}/{project}")
                       if name.endswith(".jsonl") and self._orphaned(key := f"{ROOT}/{project}/{name}")]
            for key in orphans:
                self.backend.delete_prefix(key)
            removed += orphans
        return removed

    def _orphaned(self, key: str) -> bool:
        try:
            idle_s = time.time() - self.backend.local_path(key).stat().st_mtime
        except FileNotFoundError:
            return False  # deleted meanwhile
        return idle_s > ORPHAN_AFTER_S and not self.backend.exists(key.removesuffix("l"))

    # ── reading ─────────────────────────────────────────────────────────────────────────────────────────────

    def exists(self, project: str, file_id: str) -> bool:
        return bool(FILE_ID.fullmatch(file_id or "")) and self.backend.exists(self._key(project, file_id, "json"))

    def get(self, project: str, file_id: str) -> FileObject:
        if not self.exists(project, file_id):
            raise not_found("file", file_id, "file_id")
        return FileObject(**json.loads(self.backend.get(self._key(project, file_id, "json"))))

    def content(self, project: str, file_id: str) -> bytes:
        self.get(project, file_id)
        return self.backend.get(self._key(project, file_id, "jsonl"))

    def list(self, project: str) -> list[FileObject]:
        names = [n for n in self.backend.children(f"{ROOT}/{project}") if n.endswith(".json")]
        found = [self.get(project, n.removesuffix(".json")) for n in names]
        return sorted(found, key=lambda f: f.created_at, reverse=True)


class Validator:
    """Validates uploads one at a time in the background, each from a local copy in an upload folder it holds
    from `later` on and removes when the validation ends or the validator shuts down."""

    def __init__(self, files: FileStore):
        self.files = files
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunerun-validate")
        self._held: set[Path] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sweep: threading.Timer | None = None  # recover's second look for orphans

    def later(self, project: str, file_id: str, local: Path) -> None:
        """Validate ``local`` in turn; its folder is the validator's from now on."""
        with self._lock:
            self._held.add(local.parent)
        try:
            self.pool.submit(self._validate, project, file_id, local)
        except RuntimeError:  # shut down: the file stays ``uploaded`` and the next start validates it
            self._release(local.parent)

    def _validate(self, project: str, file_id: str, local: Path) -> None:
        try:
            found = self._examine(project, file_id, local)
            if found is not None and not self._stopping.is_set():  # shutdown removes the copy being read
                self.files.settle(project, found)
        finally:
            self._release(local.parent)

    def _examine(self, project: str, file_id: str, local: Path) -> FileObject | None:
        """The verdict on the file; None when it was deleted before one could be given, or already has one."""
        try:
            if self.files.get(project, file_id).status != "uploaded":
                return None  # a start's recovery listed it while its upload's own validation was queued or running
            return self.files.examine(project, file_id, local)
        except Exception:  # noqa: BLE001 - whatever failed is the server's: the file must not wait forever
            if not self.files.exists(project, file_id):
                return None
            if not self._stopping.is_set():
                logger.exception("validating %s of project %s failed", file_id, project)
            return replace(self.files.get(project, file_id), status="error", status_details=(
                "the file could not be validated: the server failed while reading it (its log says why); upload "
                "it again, or tell the server's operator"))

    def _release(self, folder: Path) -> None:
        with self._lock:
            self._held.discard(folder)
        shutil.rmtree(folder, ignore_errors=True)

    def recover(self) -> None:
        """At start: remove what servers that died left behind, then validate the uploads they never finished.
        Runs in a thread of its own: an error (the storage unreachable) is logged, and the server serves on."""
        try:
            folders, removed = remove_dead_upload_folders(), self.files.remove_leftovers()
            if folders or removed:
                logger.info("removed what stopped servers left: %d upload folders, %d files in the storage",
                            folders, len(removed))
            # A server restarted at once (systemd's Restart=) finds its predecessor's orphans too young to tell
            # from another server's write in progress: look again once they are old enough.
            self._sweep = threading.Timer(ORPHAN_AFTER_S, self._remove_leftovers_later)
            self._sweep.daemon = True
            self._sweep.start()
            self.revalidate_unfinished()
        except Exception:  # noqa: BLE001 - the uploads left `uploaded` are validated at the next start
            logger.exception("recovering what stopped servers left failed; the server goes on without it")

    def _remove_leftovers_later(self) -> None:
        try:
            self.files.remove_leftovers()
        except Exception:  # noqa: BLE001 - a timer thread: log and let the next start try again
            logger.exception("removing what stopped servers left failed")

    def revalidate_unfinished(self) -> None:
        """Uploads whose validation a stopped server never finished are read again (from storage)."""
        for project in self.files.projects():
            for found in self.files.list(project):
                if found.status == "uploaded":
                    folder = upload_folder()
                    try:
                        local = self.files.fetch(project, found.id, folder / "data.jsonl")
                    except BaseException:
                        shutil.rmtree(folder, ignore_errors=True)
                        raise
                    self.later(project, found.id, local)

    def shutdown(self) -> None:
        """Remove every upload folder held, the running validation's too: uvicorn ends the process right after
        (it raises the SIGTERM again), so nothing would remove them later. The files stay ``uploaded``; the
        next start validates them."""
        self._stopping.set()
        if self._sweep is not None:
            self._sweep.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            held, self._held = self._held, set()
        for folder in held:
            shutil.rmtree(folder, ignore_errors=True)


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
    if too_deep(first):  # json.loads would recurse until it dies
        raise bad_request(f"{filename}: its first record is {TOO_DEEP}; no training record nests like that",
                          "file")
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


class Verdict(NamedTuple):
    status: str  # processed | error
    details: str | None  # status_details
    records: int  # records read
    format: str | None = None  # the records' format, when one was recognised


def validation_verdict(path: Path, filename: str) -> Verdict:
    """How a JSONL file reads as a training run reads it: status, details, records and their format."""
    from tunerun.trainer.data.formats import detect_format, to_conversation
    from tunerun.trainer.data.read import read_records

    total, bad, found, first = 0, [], None, ""
    try:
        for where, record, error in read_records([path]):
            total += 1
            line = f"line {where.rsplit(':', 1)[-1]}"
            if error is None:
                try:
                    fmt = detect_format(record)
                    to_conversation(record, fmt)
                except DataError as exc:
                    error = str(exc)
                else:
                    found, first = found or fmt, first or line
                    if fmt != found:  # a run refuses the whole file (one file, one format), so the upload does too
                        return Verdict("error", f"{line}: this record is {fmt} but the first one ({first}) is "
                                                f"{found}; one file holds one format: upload one file per format",
                                       total)
            if error is not None:
                bad.append(f"{line}: {error}")
    except DataError as exc:
        return Verdict("error", str(exc).replace(str(path), filename), total)
    if total == 0:
        return Verdict("error", f"{filename} holds no records", 0)
    allowed = CleanSpec().max_bad_fraction
    listed = "; ".join(bad[:LISTED_PROBLEMS]) + (f"; … {len(bad) - LISTED_PROBLEMS} more" if len(bad) > LISTED_PROBLEMS
                                                 else "")
    if bad and len(bad) / total > allowed:
        return Verdict("error", f"{len(bad)} of {total} records cannot be used (more than {allowed:.0%}): {listed}",
                       total, found)
    if bad:
        return Verdict("processed", f"{total} records; {len(bad)} malformed ones will be skipped: {listed}", total,
                       found)
    return Verdict("processed", None, total, found)
