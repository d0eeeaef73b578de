"""Checkpoint retention: keep-last and keep-best, on a local run folder and on S3 (moto over HTTP)."""
from __future__ import annotations

import uuid

import pytest

from tunerun.cluster.run_folder import RunFolder
from tunerun.jobs.spec import CheckpointSpec, StorageSpec
from tunerun.cluster import run_folder
from tunerun.trainer import checkpoint as ckpt


def _save(run: RunFolder, tmp_path, step: int, **metrics) -> str:
    """A checkpoint the way the train loop writes one: files first, the manifest (with its metrics) last."""
    local = tmp_path / f"src-{step}"
    local.mkdir()
    (local / "adapter.bin").write_bytes(bytes([step % 256]) * 64)
    name = run_folder.checkpoint_name(step)
    run.upload_dir(local, name)
    run_folder.write_manifest(run, name, step, ckpt.file_digests(local), metrics)
    return name.split("/")[-1]


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> RunFolder:
    if request.param == "local":
        return RunFolder(str(tmp_path / "runs"), "r1")
    server = request.getfixturevalue("s3_server")
    bucket = server.bucket(f"ret-{uuid.uuid4().hex[:12]}")
    return RunFolder(StorageSpec(uri=f"s3://{bucket}/runs", endpoint_url=server.endpoint), "r1")


def test_keep_last_deletes_the_oldest_complete_checkpoints(run, tmp_path):
    for step in (10, 20, 30, 40):
        _save(run, tmp_path, step, loss=1.0)
    removed, best = ckpt.apply_retention(run, CheckpointSpec(keep_last=2))
    assert removed == ["step-000010", "step-000020"] and best is None
    assert run.list_dir("checkpoints") == ["step-000030", "step-000040"]


def test_keep_best_keeps_the_lowest_loss_beside_the_newest(run, tmp_path):
    for step, loss in ((10, 2.0), (20, 0.5), (30, 0.9), (40, 1.2)):
        _save(run, tmp_path, step, loss=loss, exact_match=step / 100)
    removed, best = ckpt.apply_retention(run, CheckpointSpec(keep_last=1, keep_best=1, best_metric="loss"))
    assert best == "step-000020" and removed == ["step-000010", "step-000030"]
    assert run.list_dir("checkpoints") == ["step-000020", "step-000040"]
    latest, skipped = ckpt.latest_complete(run, tmp_path / "scratch")
    assert latest.name == "step-000040" and not skipped  # what remains is whole and resumable


def test_keep_best_by_a_higher_is_better_metric_ignores_unscored_checkpoints(run, tmp_path):
    _save(run, tmp_path, 10, exact_match=0.3)
    _save(run, tmp_path, 20, exact_match=0.8)
    _save(run, tmp_path, 25)  # written on a preemption signal: no eval at this step
    _save(run, tmp_path, 30, exact_match=0.6)
    _save(run, tmp_path, 40, exact_match=0.7)
    removed, best = ckpt.apply_retention(run, CheckpointSpec(keep_last=1, keep_best=2, best_metric="exact_match"))
    assert best == "step-000020"
    assert removed == ["step-000010", "step-000025", "step-000030"]


def test_a_retired_checkpoint_loses_its_manifest_first(tmp_path):
    """If deletion stops after the manifest, what is left is incomplete: never resumed from, cleared later."""
    run = RunFolder(str(tmp_path / "runs"), "r1")
    for step in (10, 20):
        _save(run, tmp_path, step, loss=1.0)
    deleted = []
    real_delete = run.delete

    def delete_then_crash(name: str) -> None:
        deleted.append(name)
        real_delete(name)
        raise OSError("connection reset")

    run.delete = delete_then_crash
    with pytest.raises(OSError):
        ckpt.apply_retention(run, CheckpointSpec(keep_last=1))
    assert deleted == ["checkpoints/step-000010/manifest.json"]
    run.delete = real_delete
    latest, _ = ckpt.latest_complete(run, tmp_path / "scratch")
    assert latest.name == "step-000020"
    assert ckpt.remove_incomplete(run, before_step=20) == ["step-000010"]
