"""The run folder on an S3 protocol server (moto on loopback, reached over HTTP like MinIO)."""
from __future__ import annotations

import uuid

import pytest

from tunerun.cluster.s3 import check_access, missing_credentials
from tunerun.cluster.run_folder import RunFolder, RunStore
from tunerun.jobs.errors import StorageError
from tunerun.jobs.spec import StorageSpec


@pytest.fixture
def storage(s3_server) -> StorageSpec:
    bucket = s3_server.bucket(f"runs-{uuid.uuid4().hex[:12]}")
    return StorageSpec(uri=f"s3://{bucket}/team-a", endpoint_url=s3_server.endpoint)


def test_run_folder_round_trips_files_json_and_directories(storage, tmp_path):
    run = RunFolder(storage, "demo-1")
    run.write_json("run.json", {"state": "running"})
    assert run.read_json("run.json") == {"state": "running"}
    assert run.exists("run.json") and not run.exists("nope.json")
    local = tmp_path / "ckpt"
    (local / "deepspeed").mkdir(parents=True)
    (local / "progress.json").write_text('{"step": 3}')
    (local / "deepspeed" / "rank0.pt").write_bytes(b"\x00" * 1000)
    run.upload_dir(local, "checkpoints/step-000003")
    assert run.list_files("checkpoints/step-000003") == {"progress.json": 11, "deepspeed/rank0.pt": 1000}
    assert run.list_dir("checkpoints") == ["step-000003"]
    back = run.download_dir("checkpoints/step-000003", tmp_path / "back")
    assert (back / "deepspeed" / "rank0.pt").read_bytes() == b"\x00" * 1000
    run.delete("checkpoints/step-000003")
    assert run.list_dir("checkpoints") == []
    assert run.uri("run.json") == f"{storage.uri}/demo-1/run.json"


def test_appends_are_buffered_and_survive_a_handover_between_writers(storage):
    driver, worker = RunFolder(storage, "demo-2"), RunFolder(storage, "demo-2")
    driver.event("run_started")
    driver.flush()
    for step in range(5):
        worker.append_jsonl("events.jsonl", {"event": "step", "step": step})
    worker.flush()
    driver.event("run_succeeded")
    driver.flush()
    events = [e["event"] for e in RunFolder(storage, "demo-2").read_jsonl("events.jsonl")]
    assert events == ["run_started"] + ["step"] * 5 + ["run_succeeded"]


def test_run_store_lists_runs_that_have_a_run_json(storage):
    for run_id in ("a-1", "b-2"):
        RunFolder(storage, run_id).write_json("run.json", {"state": "succeeded"})
    RunFolder(storage, "junk").write_text("x.txt", "not a run")
    store = RunStore(storage)
    assert store.run_ids() == ["a-1", "b-2"]
    assert store.open("a-1").read_json("run.json")["state"] == "succeeded"
    with pytest.raises(StorageError, match="no run 'zzz'"):
        store.open("zzz")


def test_access_check_writes_a_probe_under_the_prefix_and_leaves_nothing_behind(storage, s3_server):
    """With bucket versioning on, the probe's write and its deletion both stay visible as versions."""
    s3 = s3_server.client()
    bucket = storage.uri.split("/")[2]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    check_access(storage)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    history = s3.list_object_versions(Bucket=bucket)
    assert [v["Key"] for v in history.get("Versions", [])] == ["team-a/.tunerun-write-check"]
    assert [m["Key"] for m in history.get("DeleteMarkers", [])] == ["team-a/.tunerun-write-check"]


def test_missing_bucket_is_one_clear_error(s3_server):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        check_access(StorageSpec(uri="s3://no-such-bucket/x", endpoint_url=s3_server.endpoint))


def test_wrong_credentials_are_one_clear_error(s3_server_checking_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    spec = StorageSpec(uri="s3://team-bucket/runs", endpoint_url=s3_server_checking_credentials.endpoint)
    with pytest.raises(StorageError, match="refused the credentials") as caught:
        check_access(spec)
    assert "not-the-secret" not in str(caught.value) and "AWS_SECRET_ACCESS_KEY" in str(caught.value)


def test_unreachable_endpoint_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("tunerun.cluster.s3.MAX_ATTEMPTS", 2)
    spec = StorageSpec(uri="s3://bucket/x", endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match="did not answer"):
        check_access(spec)


def test_missing_credentials_are_named(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert missing_credentials() == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        check_access(StorageSpec(uri="s3://bucket/x", endpoint_url="http://127.0.0.1:9"))


def test_custom_endpoints_default_to_checksums_only_when_required():
    assert StorageSpec(uri="s3://bucket/x", endpoint_url="http://minio:9000").checksum_mode == "when_required"
    assert StorageSpec(uri="s3://bucket/x").checksum_mode == "when_supported"
    assert StorageSpec(uri="s3://bucket/x", checksums="when_supported",
                       endpoint_url="http://minio:9000").checksum_mode == "when_supported"


def test_outage_during_a_write_is_ridden_out(storage, s3_server):
    """Frozen for 3 s (SIGSTOP): the write waits and retries, then lands; earlier objects are intact."""
    import threading

    run = RunFolder(storage, "demo-3")
    run.write_text("before.txt", "kept")
    s3_server.freeze()
    timer = threading.Timer(3.0, s3_server.thaw)
    timer.start()
    try:
        run.write_text("during.txt", "landed")
    finally:
        timer.join()
        s3_server.thaw()
    assert run.read_text("before.txt") == "kept" and run.read_text("during.txt") == "landed"


def test_client_uses_the_configured_checksum_mode(s3_server):
    from tunerun.cluster.s3 import client

    custom = client(StorageSpec(uri="s3://bucket/x", endpoint_url=s3_server.endpoint))
    assert custom.meta.config.request_checksum_calculation == "when_required"
    assert custom.meta.config.response_checksum_validation == "when_required"
    aws = client(StorageSpec(uri="s3://bucket/x"))
    assert aws.meta.config.request_checksum_calculation == "when_supported"


def test_model_prefix_is_fetched_once_per_node_and_reused(s3_server, tmp_path, monkeypatch):
    from tunerun.cluster.s3 import fetch_prefix

    monkeypatch.setenv("TUNERUN_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.bucket(f"models-{uuid.uuid4().hex[:8]}")
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="llama/config.json", Body=b'{"a": 1}')
    s3.put_object(Bucket=bucket, Key="llama/sub/weights.bin", Body=b"\x01" * 5000)
    spec = StorageSpec(uri="s3://elsewhere/x", endpoint_url=s3_server.endpoint)
    local = fetch_prefix(spec, f"s3://{bucket}/llama", "models")
    assert (local / "config.json").read_bytes() == b'{"a": 1}'
    assert (local / "sub" / "weights.bin").stat().st_size == 5000
    stamp = (local / "sub" / "weights.bin").stat().st_mtime_ns
    assert fetch_prefix(spec, f"s3://{bucket}/llama", "models") == local
    assert (local / "sub" / "weights.bin").stat().st_mtime_ns == stamp  # reused, not downloaded again
    s3.put_object(Bucket=bucket, Key="llama/config.json", Body=b'{"a": 2}')
    assert (fetch_prefix(spec, f"s3://{bucket}/llama", "models") / "config.json").read_bytes() == b'{"a": 2}'
    with pytest.raises(StorageError, match="no objects match"):
        fetch_prefix(spec, f"s3://{bucket}/nothing-here", "models")


def test_a_claim_is_won_exactly_once_on_s3(storage):
    """Two servers on one storage both try to start a queued job: S3's conditional write lets one win."""
    run = RunFolder(storage, "claimed-1")
    assert run.claim("control/launch-1", {"by": "a"}) is True
    assert run.claim("control/launch-1", {"by": "b"}) is False
    assert run.read_json("control/launch-1") == {"by": "a"}


def test_run_folders_share_one_client_per_storage_and_credentials(storage, s3_server, monkeypatch):
    """A server opens run folders by the thousand: each must not build a boto3 client (milliseconds and a credential
    lookup each); other credentials, or another process, get a client of their own."""
    from tunerun.cluster import s3

    first, second = RunFolder(storage, "a"), RunFolder(storage, "b")
    assert first.backend.s3 is second.backend.s3 is RunStore(storage).backend.s3
    first.write_json("run.json", {"state": "running"})
    assert second.backend.s3 is first.backend.s3 and RunFolder(storage, "a").read_json("run.json")["state"] == "running"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    assert RunFolder(storage, "a").backend.s3 is not first.backend.s3
    monkeypatch.setattr(s3.os, "getpid", lambda: -1)  # a forked child: the parent's connections are not its own
    assert s3.client(storage) is not first.backend.s3
