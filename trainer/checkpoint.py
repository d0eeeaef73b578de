"""Checkpoints in the run folder: ``checkpoints/step-000200/`` with ``manifest.json`` written last.

A checkpoint is complete only when its manifest exists and every file matches its size and sha256; anything
else (a crash mid-save, a partial upload) is never resumed from. Each rank hashes the files it wrote, Ray Train
persists them (to a local folder or object storage, where the upload hashes them: `CheckpointUpload`), and rank 0
writes the manifest after a barrier, once it has checked that every rank's files arrived: the manifest is the
last object written.
"""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunerun.cluster import space
from tunerun.cluster.run_folder import (CHECKPOINT_MANIFEST, CHECKPOINTS, FILES_IN_FLIGHT, PROGRESS, RunFolder,
                                        checkpoint_folders, complete_checkpoints, complete_manifests,
                                        manifest_name, sha256_of, step_of, stored_manifest, verify)
from tunerun.jobs.errors import StorageError
from tunerun.jobs.spec import CheckpointSpec



def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass
class Progress:
    """Where training stands; with the seed this fixes the data position exactly."""

    step: int
    epoch: int
    tokens_seen: int
    world_size: int = 0  # 0: not recorded


def file_digests(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files one rank wrote for a checkpoint."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


class CheckpointUpload:
    """Ray Train's ``checkpoint_upload_fn`` for a run folder on object storage, which keeps the manifest entries of
    the files it uploaded (`digests`, {relative path: {size, sha256}}): each file is hashed in the read that feeds
    its upload, so a checkpoint reads its bytes once, rather than once to upload and once to hash (a sha256 pass
    beside the upload held the save to 0.5-0.7 of boto3's throughput, bench/bench_checkpoint_s3.py). Uploads go
    through the run folder's boto3 client, multipart with parallel parts and several files at a time, rather than
    Ray's default pyarrow ``copy_files``, which measured at 0.4 of boto3's throughput."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.digests: dict[str, dict] | None = None  # set by the upload

    def __call__(self, checkpoint, name: str):
        import ray.train

        from tunerun.cluster.s3 import pyarrow_filesystem

        self.digests = self.run.upload_hashed(Path(checkpoint.path), name)
        return ray.train.Checkpoint(path=self.run.uri(name).removeprefix("s3://"),
                                    filesystem=pyarrow_filesystem(self.run.storage))


def uploader(run: RunFolder) -> CheckpointUpload | None:
    """The upload for a checkpoint of ``run`` (None on a filesystem: Ray's own copy is right there, and the files
    are hashed with `file_digests`)."""
    return None if run.is_local else CheckpointUpload(run)


def latest_complete(run: RunFolder, scratch: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint as a local folder (downloaded into ``scratch`` from object storage),
    and a note for each newer one that was skipped and why."""
    skipped = []
    for name in reversed(checkpoint_folders(run)):
        problem, folder = _fetch_verified(run, name, scratch / name)
        if problem is None:
            return folder, skipped
        skipped.append(f"{name}: {problem}")
    return None, skipped


def _fetch_verified(run: RunFolder, name: str, local: Path) -> tuple[str | None, Path]:
    key = f"{CHECKPOINTS}/{name}"
    if run.is_local:
        manifest, problem = stored_manifest(run, name)
        return problem or verify(run.local_path(key), manifest), run.local_path(key)
    try:  # one request; a missing or short file shows in the download, which has to happen anyway
        manifest = run.read_json_if_there(manifest_name(name))
    except json.JSONDecodeError:
        return "manifest is not valid JSON", local
    if manifest is None:
        return "no manifest (incomplete save)", local
    return _download_verified(run, key, local, manifest), local


def _download_verified(run: RunFolder, key: str, local: Path, manifest: dict) -> str | None:
    """Download the manifest's files a few at a time, each hashed as it is written, so a restore costs one
    download rather than a download and then a second pass over every byte. The first problem, in manifest
    order, or None when every file matches."""
    def problem_of(entry: dict) -> str | None:
        path = local / entry["path"]
        try:
            sha256 = run.download_hashed(f"{key}/{entry['path']}", path, entry["size"])
        except FileNotFoundError:
            return f"{entry['path']} is missing or has the wrong size"
        if path.stat().st_size != entry["size"]:
            return f"{entry['path']} is missing or has the wrong size"
        return None if sha256 == entry["sha256"] else f"{entry['path']} does not match its sha256"

    with ThreadPoolExecutor(FILES_IN_FLIGHT) as pool:
        problems = [p for p in pool.map(problem_of, manifest["files"]) if p]
    (local / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))
    return problems[0] if problems else None


def space_shortage(run: RunFolder, staging: Path) -> space.Shortage | None:
    """Whether the next checkpoint would not fit: the staging folder it is written into first and, for a run
    folder on a filesystem, the run folder, each against the last complete checkpoint's size with a margin (the
    first checkpoint of a run, with nothing to size it by, needs only the write reserve)."""
    complete = complete_checkpoints(run)
    last_bytes = 0
    if complete:
        manifest = run.read_json(manifest_name(complete[-1]))
        last_bytes = sum(entry["size"] for entry in manifest["files"])
    paths = [staging, *([run.local_path(CHECKPOINTS)] if run.is_local else [])]
    return space.shortage(paths, space.needed_for_next(last_bytes))


def remove_incomplete(run: RunFolder, before_step: int) -> list[str]:
    """Delete checkpoint folders older than ``before_step`` that never got a manifest (a crash mid-save)."""
    removed = []
    for name in checkpoint_folders(run):
        if step_of(name) < before_step and not run.exists(manifest_name(name)):
            run.delete(f"{CHECKPOINTS}/{name}")
            removed.append(name)
    return removed


def apply_retention(run: RunFolder, policy: CheckpointSpec) -> tuple[list[str], str | None]:
    """Delete the complete checkpoints the policy does not keep: (their names oldest first, the best one).

    Kept: the ``keep_last`` newest and the ``keep_best`` best by ``best_metric`` (a checkpoint without that
    metric, e.g. one written on a preemption signal, is never "best"). The newest always survives, so a run
    can resume. The manifest goes first: a deletion cut short leaves a folder that is never resumed from and
    that ``remove_incomplete`` clears later.
    """
    manifests = complete_manifests(run)
    ranked = ranked_by_metric(manifests, policy)
    keep = set(sorted(manifests, reverse=True)[:policy.keep_last]) | set(ranked[:policy.keep_best])
    removed = [name for name in sorted(manifests) if name not in keep]
    for name in removed:
        run.delete(manifest_name(name))
        run.delete(f"{CHECKPOINTS}/{name}")
    return removed, (ranked[0] if policy.keep_best and ranked else None)


def ranked_by_metric(manifests: dict[str, dict], policy: CheckpointSpec) -> list[str]:
    """The checkpoints whose manifest holds ``policy.best_metric``, best first (ties: the newer first)."""
    scored = [n for n in sorted(manifests, reverse=True) if policy.best_metric in manifests[n].get("metrics", {})]
    sign = 1 if policy.best_is_lowest else -1
    return sorted(scored, key=lambda n: sign * manifests[n]["metrics"][policy.best_metric])  # stable


def best_step(run: RunFolder, policy: CheckpointSpec) -> int:
    """Step of the complete checkpoint with the best ``best_metric``; StorageError when none was scored."""
    manifests = complete_manifests(run)
    ranked = ranked_by_metric(manifests, policy)
    if not ranked:
        raise StorageError(f"{run.run_id}: no complete checkpoint holds an eval {policy.best_metric} "
                           f"({len(manifests)} complete; a checkpoint is scored when an eval ran at its step)")
    return step_of(ranked[0])


def save_progress(folder: Path, progress: Progress, rank: int) -> None:
    """Per-rank RNG state plus (rank 0) the progress counters."""
    if rank == 0:
        (folder / PROGRESS).write_text(json.dumps(asdict(progress)))
    torch.save({"torch": torch.get_rng_state(), "python": _python_rng()}, folder / _rng_file(rank))


def load_progress(folder: Path, rank: int) -> Progress:
    progress = Progress(**json.loads((folder / PROGRESS).read_text()))
    rng_file = folder / _rng_file(rank)
    if rng_file.is_file():  # absent when the world size changed since the save
        state = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(state["torch"])
        random.setstate(_python_rng_from(state["python"]))
    return progress


def _python_rng() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_from(saved: dict) -> tuple:
    return saved["version"], tuple(int(x) for x in saved["state"].tolist()), saved["gauss"]
