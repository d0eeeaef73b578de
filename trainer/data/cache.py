"""Prepared data, cached by content: the same inputs are never tokenized twice.

The cache key is a hash of everything the prepared files depend on: the bytes (and names) of every input file, the
``data`` spec, the training objective (named only when not ``sft``), the tokenizer files, the seed, the versions of
transformers/tokenizers and `FORMAT_VERSION`. ``<cache_root>/<hash>/`` holds train.jsonl, eval.jsonl,
data_report.json/.html/.png and a ``COMPLETE`` marker; a folder is built under a temporary name and renamed into
place whole, so a reader never sees half of one and two preparations racing for the same key both end with a
complete folder.

The cache root is ``$TUNERUN_CACHE/prepared`` (default ``~/.cache/tunerun/prepared``), beside the node cache
of S3 models and data (``models/``, ``data/``). Every reuse touches the marker, so `cache_entries` knows
when an entry was last used and ``tunerun data cache prune`` removes the least recently used first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunerun.cluster.run_folder import DATA_REPORT_FILE, PREPARED_FILES
from tunerun.cluster.storage import cache_root as node_cache
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.data_files import resolve_files
from tunerun.trainer.objectives import DEFAULT as DEFAULT_OBJECTIVE

FORMAT_VERSION = 3  # bump when the prepared files would come out different for the same inputs
MARKER = "COMPLETE"
TOKENIZER_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".py", ".tiktoken")
MAX_TOKENIZER_FILE = 64 << 20  # skips weights stored under those suffixes; tokenizer files are smaller


def default_cache_root() -> Path:
    return node_cache() / "prepared"


def read_report(folder: Path) -> dict:
    """The data report of a prepared folder (a cache folder or a run's ``data/``)."""
    return json.loads((Path(folder) / DATA_REPORT_FILE).read_text(encoding="utf-8"))


def prepare_to_folder(job: ResolvedJob, out_dir: Path | None, cache_root: Path | None) -> dict:
    """Prepare the job's data (or reuse the cached preparation) and put the files into ``out_dir``; returns
    the report. ``cache_root`` None means `default_cache_root`."""
    folder, _ = prepared_folder(job, cache_root)
    if out_dir is not None and Path(out_dir).resolve() != folder.resolve():
        publish(folder, Path(out_dir))
    return read_report(folder)


def prepared_folder(job: ResolvedJob, cache_root: Path | None) -> tuple[Path, bool]:
    """The complete cache folder for the job's data, and whether it already existed."""
    root = Path(cache_root) if cache_root else default_cache_root()
    folder = root / content_hash(job)
    if (folder / MARKER).is_file():
        _touch(folder / MARKER)
        return folder, True
    _build(job, folder)
    return folder, False


def content_hash(job: ResolvedJob) -> str:
    spec = job.spec
    h = hashlib.blake2b(digest_size=16)
    _feed(h, f"format {FORMAT_VERSION} seed {spec.training.seed}")
    _feed(h, json.dumps(spec.data.model_dump(mode="json"), sort_keys=True))
    if spec.training.objective != DEFAULT_OBJECTIVE:  # it decides what a record becomes; fed only when not the
        _feed(h, f"objective {spec.training.objective}")  # default, so caches from before the field still serve
    packages = ["transformers", "tokenizers"]
    if spec.data.clean.ner is not None:  # another pipeline version finds other names: another preparation
        pipelines = sorted(set(spec.data.clean.ner.models().values()))
        packages += ["presidio-analyzer", "presidio-anonymizer", "spacy", *pipelines]
    for package in packages:
        _feed(h, f"{package} {_version(package)}")
    for pattern in (spec.data.train, spec.data.eval):
        for path in resolve_files(pattern) if pattern else []:
            _feed_file(h, path)
    model = Path(spec.model.path)
    if model.is_dir():  # a remote model is refused when the tokenizer loads, not here
        for path in sorted(model.iterdir()):
            if path.suffix in TOKENIZER_SUFFIXES and path.is_file() and path.stat().st_size <= MAX_TOKENIZER_FILE:
                _feed_file(h, path, path.name)  # by name: the same tokenizer elsewhere reuses the cache
    _feed(h, f"trust_remote_code {spec.model.trust_remote_code}")
    return h.hexdigest()


def _feed(h, text: str) -> None:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two inputs run together


def _feed_file(h, path: Path, name: str | None = None) -> None:
    # Data files count with their path: the report names them, and it is cached too.
    _feed(h, f"file {name or path} {path.stat().st_size}")
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            h.update(chunk)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _build(job: ResolvedJob, folder: Path) -> None:
    from tunerun.trainer.data.pipeline import prepare_files
    from tunerun.trainer.data.report import write_report_files
    from tunerun.trainer.objectives import objective_for
    from tunerun.trainer.tokenizer import load_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        report = prepare_files(job.spec.data, load_tokenizer(job), job.spec.training.seed, tmp,
                               objective_for(job.spec))
        report_dict = dataclasses.asdict(report)
        write_report_files(report_dict, tmp, f"data report · {job.spec.name}")
        (tmp / DATA_REPORT_FILE).write_text(json.dumps(report_dict, indent=2, sort_keys=True) + "\n")
        (tmp / MARKER).write_text(f"format {FORMAT_VERSION}\n")
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, folder: Path) -> None:
    if folder.exists() and not (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # left by a crashed preparation of an older tunerun
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / MARKER).is_file():  # not another process winning the race: a real failure
            raise


def publish(folder: Path, out_dir: Path) -> None:
    """Hard-link (or copy, across file systems) the prepared files into ``out_dir``, report JSON last.

    Links are safe: nothing writes into a prepared file after it is complete, it is only ever replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PREPARED_FILES:
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(folder / name, tmp)
        except OSError:
            shutil.copyfile(folder / name, tmp)
        os.replace(tmp, out_dir / name)


# ---------------------------------------------------------------- listing and pruning


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes of the files in it
    last_used: float  # epoch seconds: the marker's mtime (touched on reuse), else the folder's
    complete: bool  # False: a preparation that crashed or is running now (a hidden temporary folder)
    records: int | None  # train + eval examples, from its data report
    files: str  # the data files it was prepared from, as its report names them


def _touch(marker: Path) -> None:
    try:
        os.utime(marker)
    except OSError:
        pass  # a read-only cache still serves; it only cannot say it was used


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every prepared folder under ``root`` (and left-over temporary ones), least recently used first."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        marker = folder / MARKER
        complete = marker.is_file() and not folder.name.startswith(".")
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        records, files = None, ""
        report_file = folder / DATA_REPORT_FILE
        if complete and report_file.is_file():
            report = json.loads(report_file.read_text(encoding="utf-8"))
            records = report.get("train_records", 0) + report.get("eval_records", 0)
            files = ", ".join(report.get("files", []))
        last_used = (marker if marker.is_file() else folder).stat().st_mtime
        entries.append(CacheEntry(folder, size, last_used, complete, records, files))
    return sorted(entries, key=lambda e: e.last_used)


def prune_plan(entries: list[CacheEntry], now: float, older_than: float | None, keep_bytes: int | None,
               busy_after: float) -> list[CacheEntry]:
    """The entries to remove: temporary folders left by crashed preparations (older than ``busy_after``
    seconds; a younger one is a preparation still running and is never chosen), those unused for more than
    ``older_than`` seconds, then the least recently used until at most ``keep_bytes`` remain."""
    candidates = [e for e in entries if e.complete or now - e.last_used > busy_after]
    chosen = [e for e in candidates if not e.complete
              or (older_than is not None and now - e.last_used > older_than)]
    if keep_bytes is not None:
        left = sum(e.size for e in entries) - sum(e.size for e in chosen)
        for entry in candidates:  # least recently used first
            if left <= keep_bytes:
                break
            if entry not in chosen:
                chosen.append(entry)
                left -= entry.size
    return chosen


def remove_entry(entry: CacheEntry) -> None:
    """Remove a prepared folder, marker first: a reader that finds no marker rebuilds instead of reading a
    folder half deleted."""
    (entry.path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(entry.path, ignore_errors=True)
