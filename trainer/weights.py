"""Which weights of a run to use: the final weights or a complete checkpoint, as a local folder.

Both `tunerun eval` (`tunerun.trainer.evaluation.on_demand`) and `tunerun export` (`tunerun.trainer.export`)
start here, so this module belongs to neither: evaluation never imports export. It only finds and verifies
files; turning them into a model is the method's job (`Method.load_trained`, `Method.merged_model`), because
only the method knows what its files hold (a PEFT adapter, trainable tensors, ZeRO shards).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunerun.cluster.run_folder import (CHECKPOINT_MANIFEST, FINAL, checkpoint_name, complete_checkpoints, events,
                                        final_weights, step_of, verify)
from tunerun.jobs.errors import StorageError


@dataclass
class RunWeights:
    name: str  # "final" or "checkpoints/step-000020"
    step: int | None
    folder: Path  # local folder holding the files (downloaded first for object storage)
    full: bool  # consolidated/DeepSpeed weights (full) rather than an adapter (lora, qlora)


def run_local_path(run, name: str, scratch: Path | None = None) -> Path:
    """A local path for a run-folder file or folder: in place on a filesystem, else downloaded to ``scratch``."""
    if run.is_local:
        return run.local_path(name)
    scratch = scratch or Path(tempfile.mkdtemp(prefix="tunerun-fetch-"))
    if run.list_files(name):
        return run.download_dir(name, scratch / name)
    return run.download(name, scratch / name) if run.exists(name) else scratch / "absent" / name


def find_weights(run, job, checkpoint: int | None, scratch: Path | None = None) -> RunWeights:
    """The checkpoint at step ``checkpoint`` (must be complete), else the final weights, else the newest
    complete checkpoint. Raises StorageError naming what exists when there is nothing usable."""
    from tunerun.trainer.methods import method_for

    if checkpoint is not None:
        name = checkpoint_name(checkpoint)
        if not run.exists(f"{name}/{CHECKPOINT_MANIFEST}"):
            state = "is incomplete (no manifest: the save never finished)" if run.list_dir(name) else "does not exist"
            raise StorageError(f"{run.run_id}: checkpoint step {checkpoint} {state}; complete checkpoints: "
                               f"{_complete_steps(run) or 'none'}")
        folder = run_local_path(run, name, scratch)
        problem = verify(folder)
        if problem:
            raise StorageError(f"{run.run_id}: checkpoint step {checkpoint} is damaged: {problem}")
        return RunWeights(name, checkpoint, folder, _full(job))
    final_step = _exported_step(run)
    if final_step is not None:
        folder = run_local_path(run, final_weights(method_for(job.spec.method).FINAL_DIR), scratch)
        return RunWeights(FINAL, final_step, folder, _full(job))
    from tunerun.trainer.checkpoint import latest_complete  # torch: only once no final weights answered

    folder, skipped = latest_complete(run, Path(scratch or tempfile.mkdtemp(prefix="tunerun-fetch-")))
    if folder is None:
        notes = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise StorageError(f"{run.run_id} has no final weights and no complete checkpoint{notes}; "
                           "nothing to evaluate or export yet")
    step = step_of(folder.name)
    return RunWeights(checkpoint_name(step), step, folder, _full(job))


def _full(job) -> bool:
    """Whether the run's weights are whole (full fine-tune) rather than an adapter. Asked only once weights are
    found: the method's module imports peft and transformers, seconds that a user's mistake need not wait for."""
    from tunerun.trainer.methods import method_for

    return not method_for(job.spec.method).ADAPTER


def _exported_step(run) -> int | None:
    # Rank 0 records `exported` after every rank finished writing final/: before that the folder may be partial.
    exported = [e for e in events(run) if e.get("event") == "exported"]
    return exported[-1].get("step") if exported else None


def _complete_steps(run) -> str:
    return ", ".join(str(step_of(name)) for name in complete_checkpoints(run))
