"""Which local files a data path names: a file, a folder of data files, or a glob; torch-free, so `tunerun
validate` and `plan` check paths exactly as the trainer's data pipeline later reads them."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from tunerun.jobs.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def resolve_files(pattern: str) -> list[Path]:
    """The data files a path or glob names, sorted; `DataError` if there are none."""
    if "://" in pattern:
        # `tunerun data` and the trainer fetch s3:// data into the node cache first (trainer.inputs.localize_data).
        raise DataError(f"data file {pattern}: object-storage data ({pattern.split('://')[0]}://) is read from its "
                        "local copy; fetch it first (tunerun.trainer.inputs.localize_data, as `tunerun data prepare` "
                        "and every run do)")
    expanded = os.path.expanduser(pattern)
    where = f"relative paths are read from the current directory, {os.getcwd()}"
    if glob.has_magic(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise DataError(f"no data files match {pattern!r}; check the path ({where})")
    elif os.path.isdir(expanded):  # e.g. an object-storage prefix fetched to a local folder
        files = sorted(p for p in Path(expanded).iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"data folder {pattern!r} holds no {', '.join(SUFFIXES)} files; name the files, "
                            f"e.g. '{pattern.rstrip('/')}/*.jsonl'")
    elif not os.path.isfile(expanded):
        raise DataError(f"data file not found: {pattern!r}; check the path ({where})")
    else:
        files = [Path(expanded)]
    for path in files:
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"data file {path}: unsupported type {path.suffix or '(no suffix)'!r}; expected .jsonl "
                            "(one JSON object per line), .json, .parquet or .csv")
    return files
