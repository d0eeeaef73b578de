"""Checkpoints in the run folder: ``checkpoints/step-000200/`` with ``manifest.json`` written last.

A checkpoint is complete only when its manifest exists and every file matches its size and sha256; anything
else (a crash mid-save, a partial upload) is never resumed from. Ray Train persists the files each rank
wrote; rank 0 writes the manifest after a barrier, so it always describes every rank's files.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoints/{PREFIX}{step:06d}"


@dataclass
class Progress:
    """Where training stands; with the seed this fixes the data position exactly."""

    step: int
    epoch: int
    tokens_seen: int


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "step": step,
        "files": [{"path": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": sha256_of(p)}
                  for p in files],
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(folder / MANIFEST)
    return manifest


def verify(folder: Path) -> str | None:
    """None when the checkpoint is complete, else why it is not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (incomplete save)"
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
            return f"{entry['path']} does not match its sha256"
    return None


def latest_complete(run_path: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint, and a note for each newer one that was skipped."""
    skipped = []
    folders = sorted((run_path / "checkpoints").glob(f"{PREFIX}*"), reverse=True)
    for folder in folders:
        problem = verify(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {problem}")
    return None, skipped


def save_progress(folder: Path, progress: Progress, rank: int) -> None:
    """Per-rank RNG state plus (rank 0) the progress counters."""
    if rank == 0:
        (folder / "progress.json").write_text(json.dumps(asdict(progress)))
    torch.save({"torch": torch.get_rng_state(), "python": _python_rng()}, folder / f"rng-rank{rank}.pt")


def load_progress(folder: Path, rank: int) -> Progress:
    progress = Progress(**json.loads((folder / "progress.json").read_text()))
    rng_file = folder / f"rng-rank{rank}.pt"
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
