"""Room on the filesystems a run writes to: checked before each checkpoint, and recognised when it ran out anyway.

Before a checkpoint, every worker compares the free space of the filesystems it is about to write (the run
folder's, when it is a local or shared folder, and the local staging folder every checkpoint passes through)
with the size of the last complete checkpoint plus a margin (`needed_for_next`). When the disk fills anyway
(another process took the space mid-write), the error is recognised wherever it surfaces — an ``OSError`` with
``ENOSPC``/``EDQUOT``, or its text inside an error Ray shipped from a worker (`disk_full_in`).
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Each checkpoint of a run has the same files of about the same size; 10% covers what grows (optimizer state of
# parameters that started at zero, a longer metrics history in a manifest).
CHECKPOINT_MARGIN = 1.10
# Written between two checkpoints besides the checkpoint itself: metrics and events lines, run.json, the driver
# log. A run that cannot afford this much would fail at the next metrics line instead of at a checkpoint.
WRITE_RESERVE_BYTES = 1 << 20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]|DiskFullError: ")
_DISK_FULL_ERROR_TEXT = re.compile(r"DiskFullError: (.+)")
_FULL_PATH = re.compile(r"(?:No space left on device|Disk quota exceeded)\]?:? ?'([^']+)'")


@dataclass(frozen=True)
class Shortage:
    """A filesystem without room for what is about to be written."""

    filesystem: str  # its mount point and type, e.g. "/mnt/scratch (tmpfs)"
    path: str  # the folder that would have been written
    free: int
    needed: int

    def describe(self) -> str:
        return (f"{self.filesystem} has {size_text(self.free)} free, the next checkpoint needs {size_text(self.needed)} "
                f"(writing {self.path})")


def needed_for_next(last_checkpoint_bytes: int) -> int:
    return int(last_checkpoint_bytes * CHECKPOINT_MARGIN) + WRITE_RESERVE_BYTES


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest parent)."""
    stats = os.statvfs(_existing(Path(path)))
    return stats.f_bavail * stats.f_frsize


def shortage(paths: list[str | Path], needed: int) -> Shortage | None:
    """The first of ``paths`` whose filesystem has less than ``needed`` bytes free; each filesystem counts once."""
    seen = set()
    for path in paths:
        existing = _existing(Path(path))
        device = existing.stat().st_dev
        if device in seen:
            continue
        seen.add(device)
        free = free_bytes(existing)
        if free < needed:
            return Shortage(filesystem_of(existing), str(path), free, needed)
    return None


def filesystem_of(path: str | Path) -> str:
    """The mount point holding ``path`` and its type, as `df` would name it."""
    path = _existing(Path(path)).resolve()
    mounts = {}
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            mounts[fields[1].replace("\\040", " ")] = fields[2]
    except OSError:  # not Linux: the mount point alone
        pass
    point = path
    while not os.path.ismount(point) and point != point.parent:
        point = point.parent
    kind = mounts.get(str(point))
    return f"{point} ({kind})" if kind else str(point)


def is_disk_full(exc: BaseException) -> bool:
    return disk_full_in(exc) is not None


def disk_full_in(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that says a disk is full: an OSError with ENOSPC/EDQUOT, a `DiskFullError`,
    or an error whose text carries one (Ray wraps worker exceptions, keeping their message, not their class)."""
    from tunerun.jobs.errors import DiskFullError

    seen = set()
    todo = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
            return error
        if _DISK_FULL_TEXT.search(str(error)):
            return error
        todo += [error.__cause__, error.__context__]
        failures = getattr(error, "worker_failures", None)  # ray.train's TrainingFailedError
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def full_path(error: BaseException) -> str | None:
    """The file an ENOSPC error was writing, where the error says it."""
    if isinstance(error, OSError) and error.filename:
        return str(error.filename)
    match = _FULL_PATH.search(str(error))
    return match.group(1) if match else None


def describe_disk_full(error: BaseException, fallback_path: str) -> str:
    """What ran out, in a few words: a `DiskFullError`'s own text (also when Ray passed it on as text), else the
    path an ENOSPC error names."""
    from tunerun.jobs.errors import DiskFullError

    if isinstance(error, DiskFullError):
        return str(error)
    match = _DISK_FULL_ERROR_TEXT.search(str(error))
    if match:
        return match.group(1).strip()
    path = full_path(error) or fallback_path
    return f"no space left on {filesystem_of(path)} writing {path}"


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a folder not created yet lives on its parent's filesystem)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
