"""The user-facing error hierarchy.

Every error a person can fix derives from `TunerunError`; the CLI prints it as one message and exits 2.
They are picklable (everything lives in ``args``) because Ray ships exceptions between processes.
"""
from __future__ import annotations

from dataclasses import dataclass


class TunerunError(Exception):
    """A problem the user can fix; rendered as one message, exit code 2."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


@dataclass(frozen=True)
class Problem:
    """One problem in a job spec: where it is and what to do about it."""

    path: str  # dotted field path, e.g. "training.micro_batch_size"
    message: str
    line: int | None = None

    def render(self) -> str:
        where = f"line {self.line:<4} " if self.line else "          "
        return f"  {where} {self.path or '(top level)'}: {self.message}"


class SpecError(TunerunError):
    """The job spec is invalid; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]):
        super().__init__(source, list(problems))

    @property
    def source(self) -> str:
        return self.args[0]

    @property
    def problems(self) -> list[Problem]:
        return self.args[1]

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(p.render() for p in self.problems)])


class DataError(TunerunError):
    """The training or evaluation data cannot be used as given."""


class StorageError(TunerunError):
    """The run folder or a storage location cannot be read or written."""


class ExportError(TunerunError):
    """An export cannot be produced as asked (unsupported architecture or chat template, converter refusal, a
    converted file that does not answer like the model it came from)."""


class TargetError(TunerunError):
    """A launch target (local Ray, Ray cluster, Slurm, Kubernetes) refused or failed the job."""


class UnreadableJob(StorageError):
    """A run's job.yaml is there but this tunerun cannot read it (damaged, or written by another version)."""


class RunNotFound(StorageError):
    """No run with that id exists in the storage location."""


class DiskFullError(StorageError):
    """A filesystem the run writes to has no room left (or would not have for the next checkpoint): the message
    names the filesystem, free against needed space, the last complete checkpoint and the command to resume."""
