"""Checkpoint save and restore on an S3 protocol server (moto on loopback, over HTTP like MinIO): the upload hashes
each file in the read that feeds it, the manifest is written last, and a restore that downloads and hashes in one
pass still refuses a checkpoint whose bytes were changed in the store."""
from __future__ import annotations

import hashlib
import io
import os
import uuid

import pytest

from tunerun.cluster import run_folder, s3
from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.storage import HashingReader
from tunerun.jobs.spec import StorageSpec
from tunerun.trainer import checkpoint as ckpt

MIB = 1024**2


@pytest.fixture
def run(s3_server) -> RunFolder:
    bucket = s3_server.bucket(f"ckpt-{uuid.uuid4().hex[:12]}")
    return RunFolder(StorageSpec(uri=f"s3://{bucket}/runs", endpoint_url=s3_server.endpoint), "r1")


@pytest.fixture
def small_parts(monkeypatch):
    """Multipart from 8 MiB in 5 MiB parts (S3's smallest), so a 12 MiB file goes up and down in three parts."""
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 8 * MIB)
    monkeypatch.setattr(s3, "MIN_PART", 5 * MIB)


def _checkpoint_files(folder, step: int) -> None:
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "progress.json").write_text(f'{{"step": {step}}}')
    (folder / "trainable.safetensors").write_bytes(os.urandom(300_000))
    (folder / "deepspeed" / "optim-rank0.pt").write_bytes(os.urandom(12 * MIB))  # multipart with small_parts
    (folder / "empty.txt").write_bytes(b"")


def _save(run: RunFolder, tmp_path, step: int) -> dict:
    """A checkpoint the way the train loop saves one on object storage: Ray Train's upload, then the manifest."""
    import ray.train

    local = tmp_path / f"local-{step}"
    _checkpoint_files(local, step)
    upload = ckpt.uploader(run)
    name = run_folder.checkpoint_name(step)
    persisted = upload(ray.train.Checkpoint.from_directory(str(local)), name)
    assert persisted.path == run.uri(name).removeprefix("s3://")
    return run_folder.write_manifest(run, name, step, upload.digests)


def test_the_upload_hashes_every_file_as_a_separate_pass_would(run, tmp_path, small_parts):
    manifest = _save(run, tmp_path, 2)
    local = tmp_path / "local-2"
    assert {e["path"]: {"size": e["size"], "sha256": e["sha256"]} for e in manifest["files"]} \
        == ckpt.file_digests(local)
    stored = run.read_bytes("checkpoints/step-000002/deepspeed/optim-rank0.pt")
    assert stored == (local / "deepspeed" / "optim-rank0.pt").read_bytes()
    assert run.list_files("checkpoints/step-000002")["empty.txt"] == 0


def test_the_manifest_is_the_last_object_written(run, tmp_path, small_parts):
    written = []
    upload_hashed, put = run.backend.upload_hashed, run.backend.put

    def record_upload(path, key):
        digest = upload_hashed(path, key)
        written.append(key)
        return digest

    def record_put(key, data):
        put(key, data)
        written.append(key)

    run.backend.upload_hashed, run.backend.put = record_upload, record_put
    _save(run, tmp_path, 2)
    assert len(written) == 5 and written[-1] == "r1/checkpoints/step-000002/manifest.json"


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "deepspeed/optim-rank0.pt"])
def test_a_checkpoint_changed_in_the_store_is_skipped_on_resume(run, tmp_path, small_parts, damaged):
    """Same size, other bytes: only the sha256 can tell. The large file comes back in ranged parts."""
    _save(run, tmp_path, 2)
    _save(run, tmp_path, 4)
    key = f"checkpoints/step-000004/{damaged}"
    good = run.read_bytes(key)
    run.write_bytes(key, good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    latest, skipped = ckpt.latest_complete(run, tmp_path / "scratch")
    assert latest.name == "step-000002"
    assert skipped == [f"step-000004: {damaged} does not match its sha256"]
    assert (latest / damaged).read_bytes() == (tmp_path / "local-2" / damaged).read_bytes()


def test_missing_short_and_unfinished_checkpoints_are_skipped_with_the_reason(run, tmp_path):
    for step in (2, 4, 6, 8):
        _save(run, tmp_path, step)
    run.delete("checkpoints/step-000008/manifest.json")  # a save cut short before its manifest
    run.delete("checkpoints/step-000006/progress.json")
    key = "checkpoints/step-000004/trainable.safetensors"
    run.write_bytes(key, run.read_bytes(key)[:-1])
    latest, skipped = ckpt.latest_complete(run, tmp_path / "scratch")
    assert latest.name == "step-000002"
    assert skipped == ["step-000008: no manifest (incomplete save)",
                       "step-000006: progress.json is missing or has the wrong size",
                       "step-000004: trainable.safetensors is missing or has the wrong size"]


def test_a_restore_from_a_manifest_written_before_the_upload_hashed_verifies(run, tmp_path):
    """Checkpoints of earlier runs: files uploaded plainly, hashed in a separate pass."""
    local = tmp_path / "old"
    _checkpoint_files(local, 3)
    run.upload_dir(local, "checkpoints/step-000003")
    run_folder.write_manifest(run, "checkpoints/step-000003", 3, ckpt.file_digests(local))
    latest, skipped = ckpt.latest_complete(run, tmp_path / "scratch")
    assert latest.name == "step-000003" and not skipped
    optimizer = "deepspeed/optim-rank0.pt"
    assert (latest / optimizer).read_bytes() == (local / optimizer).read_bytes()


def test_a_read_again_after_a_retry_is_not_hashed_twice():
    data = os.urandom(3 * MIB + 17)
    reader = HashingReader(io.BytesIO(data))
    reader.read(MIB)
    reader.seek(0)  # a retry starts the body over
    while reader.read(256 * 1024):
        pass
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def test_bytes_the_upload_skipped_are_hashed_at_the_end():
    data = os.urandom(2 * MIB)
    reader = HashingReader(io.BytesIO(data))
    reader.read(1000)
    reader.seek(5000)
    reader.read(1000)
    assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_local_run_folder_copies_and_hashes_in_one_pass_too(tmp_path):
    run = RunFolder(str(tmp_path / "runs"), "r1")
    local = tmp_path / "local"
    _checkpoint_files(local, 2)
    digests = run.upload_hashed(local, "checkpoints/step-000002")
    assert digests == ckpt.file_digests(run.local_path("checkpoints/step-000002")) == ckpt.file_digests(local)
    entry = digests["trainable.safetensors"]
    back = tmp_path / "back.bin"
    assert run.download_hashed("checkpoints/step-000002/trainable.safetensors", back, entry["size"]) \
        == entry["sha256"]
