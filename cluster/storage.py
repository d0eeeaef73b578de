"""Where a run folder's bytes live: a local path (`LocalBackend`, here) or ``s3://bucket/prefix`` on an
S3-compatible store (`tunerun.cluster.s3`). Both answer the same small interface of keys and bytes; what the keys
are and what the files hold is `tunerun.cluster.run_folder`.

A local storage is often a folder on a shared login node, and it holds the service's secrets (the session
secret, key hashes) and users' training data: `LocalBackend` makes every file 0600 and every folder 0700 itself,
whatever the umask of the process that writes. Nothing it writes is ever seen half-written, and a write that
fails (a full disk) or whose writer dies (kill -9, a crash) leaves only a temp file that names its writer, so the
next start can tell it from a write still in progress and remove it (`LocalBackend.remove_interrupted_writes`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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

    def upload_hashed(self, path: Path, key: str) -> str:
        """`upload_file` that also returns the sha256 of the bytes, taken from the read that copies them."""
        return _copy_hashed(Path(path), self.root / key)

    def download_hashed(self, key: str, path: Path, size: int = 0) -> str:
        """`download_file` that also returns the sha256 of the bytes (``size`` chooses nothing on a disk)."""
        return _copy_hashed(self.root / key, Path(path))

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


class HashingReader:
    """A binary file for an upload to read, hashing its bytes (sha256) as they go by, so one read of the file both
    feeds the upload and hashes it. A retry seeks back and reads again: only bytes past those already hashed
    count; bytes the upload skipped (it never does, reading in order) are read again by `hexdigest`."""

    def __init__(self, handle):
        self._handle, self._digest, self._hashed = handle, hashlib.sha256(), 0

    def read(self, amount: int = -1) -> bytes:
        start = self._handle.tell()
        data = self._handle.read(amount)
        if start <= self._hashed < start + len(data):
            self._digest.update(memoryview(data)[self._hashed - start:])
            self._hashed = start + len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        """s3transfer closes what a one-request upload read; the handle stays open for `hexdigest` (its owner
        closes it)."""

    def hexdigest(self) -> str:
        """The sha256 of the whole file (call once the upload is done)."""
        self._handle.seek(self._hashed)
        while chunk := self._handle.read(1 << 20):
            self._digest.update(chunk)
            self._hashed += len(chunk)
        return self._digest.hexdigest()


class HashingWriter:
    """A write-only binary file for a download to stream into, hashing (sha256) what it writes. It cannot seek, so
    a ranged download writes its parts here in order (s3transfer buffers parts that arrive early)."""

    def __init__(self, handle):
        self._handle, self._digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._handle.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _copy_hashed(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` (landing whole, like every write here) and return the sha256 of its bytes."""
    digest = hashlib.sha256()

    def fill(partial: Path) -> None:
        with source.open("rb") as reading, partial.open("wb") as writing:
            while chunk := reading.read(1 << 20):
                digest.update(chunk)
                writing.write(chunk)

    _write_whole(target, fill, os.replace)
    return digest.hexdigest()


def cache_root() -> Path:
    """This node's cache (``$TUNERUN_CACHE``, default ``~/.cache/tunerun``): models and data fetched from object
    storage, prepared data, driver logs spooled before upload, the CLI's own log."""
    return Path(os.environ.get("TUNERUN_CACHE") or Path.home() / ".cache" / "tunerun")


def backend_for(storage: StorageSpec | str):
    spec = StorageSpec(uri=storage) if isinstance(storage, str) else storage
    if spec.is_s3:
        from tunerun.cluster.s3 import S3Backend

        return S3Backend(spec)
    return LocalBackend(spec.uri)
