"""Checkpoint models (``ft:…:ckpt-step-N``) on an engine pod: the gateway makes the checkpoint's adapter on its first
request and leaves a note in the storage; the pod's sidecar (`tunerun.jobs.service.engine_files.AdapterMirror`)
copies that adapter, once, to where the gateway tells the engine to load it — against a real S3 protocol server on
loopback (moto) and through the gateway's own route. vLLM loading such a folder: tests/e2e/test_inference.py."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from tunerun.cluster.run_folder import (ADAPTER_CONFIG, ADAPTER_FILE, CHECKPOINT_MANIFEST, RUN_INFO, SERVICE_RECORD,
                                        TRAINABLE, RunFolder, checkpoint_name, final_weights)
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.checkpoint_adapters import WANTED, checkpoint_adapter, wanted_checkpoints
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.engine_files import AdapterMirror
from tunerun.jobs.service.engines import adapter_key
from tunerun.jobs.service.fine_tuning import ServiceRecord, checkpoint_model
from tunerun.jobs.spec import StorageSpec

MODEL = "support-8b"
TENSORS = {"base_model.model.layers.0.q_proj.lora_A.default.weight": np.arange(8, dtype=np.float32).reshape(2, 4)}


def lora_job(storage: StorageSpec, model: str = MODEL, steps: tuple[int, ...] = (4, 8)) -> ServiceRecord:
    """A succeeded LoRA job as the trainer leaves it: final/adapter and DDP checkpoints of its trained tensors."""
    ident = f"ftjob-{uuid.uuid4().hex[:24]}"
    run = RunFolder(storage, ident)
    record = ServiceRecord(job_id=ident, project="acme", model=model, created_at=time.time(),
                           request={"training_file": "file-1"}, result_file="file-2", hyperparameters={}, seed=0)
    run.write_json(SERVICE_RECORD, vars(record))
    run.write_json(RUN_INFO, {"run_id": ident, "state": "succeeded", "target": "k8s"})
    run.write_text(f"{final_weights('adapter')}/{ADAPTER_CONFIG}", '{"r": 8}')
    run.write_bytes(f"{final_weights('adapter')}/{ADAPTER_FILE}", save(TENSORS))
    for step in steps:
        run.write_bytes(f"{checkpoint_name(step)}/{TRAINABLE}", save({k: v + step for k, v in TENSORS.items()}))
        run.write_text(f"{checkpoint_name(step)}/{CHECKPOINT_MANIFEST}", json.dumps({"step": step, "files": []}))
    return record


@pytest.fixture
def s3_storage(s3_server) -> StorageSpec:
    return StorageSpec(uri=f"s3://{s3_server.bucket(f'ckpt-{uuid.uuid4().hex[:12]}')}/tunerun",
                       endpoint_url=s3_server.endpoint)


def test_a_checkpoint_the_gateway_was_asked_for_is_copied_once_and_only_then(s3_storage, tmp_path):
    into = tmp_path / "adapters"
    record, other = lora_job(s3_storage), lora_job(s3_storage, model="other-model")
    mirror = AdapterMirror(s3_storage, MODEL, into)
    assert mirror.sync() == [record.job_id]  # the final adapter; no checkpoint was asked for
    assert not (into / record.job_id / "exports").exists()

    run = RunFolder(s3_storage, record.job_id)
    folder = checkpoint_adapter(run, 4)  # what the gateway does on the first request for ckpt-step-4
    checkpoint_adapter(RunFolder(s3_storage, other.job_id), 4)  # another model's: its own engine copies it
    assert wanted_checkpoints(run.backend) == sorted([(record.job_id, 4), (other.job_id, 4)])
    key = adapter_key(record.job_id, folder)
    assert mirror.sync() == [key]
    copied = into / key
    assert (copied / ADAPTER_FILE).read_bytes() == run.read_bytes(f"{folder}/{ADAPTER_FILE}")
    assert set(load((copied / ADAPTER_FILE).read_bytes())) == {"base_model.model.layers.0.q_proj.lora_A.weight"}
    assert json.loads((copied / ADAPTER_CONFIG).read_text()) == {"r": 8}  # the run's own config beside it
    stamp = (copied / ADAPTER_FILE).stat().st_mtime_ns
    assert mirror.sync() == []  # copied once
    assert (copied / ADAPTER_FILE).stat().st_mtime_ns == stamp
    assert not (into / other.job_id).exists() and not (into / record.job_id / "exports/step-000008-adapter").exists()
    # A new sidecar in the same pod finds the copies there and copies nothing again.
    assert AdapterMirror(s3_storage, MODEL, into).sync() == []
    # Asked again (another server process), the note is written once.
    checkpoint_adapter(run, 4)
    assert run.backend.children(WANTED).count(f"{record.job_id}~4") == 1


def test_the_engine_is_asked_to_load_a_checkpoint_exactly_where_the_sidecar_put_it(served, tmp_path):
    """The gateway's path for an external engine (the pod's Service) and the sidecar's copy are one key."""
    into = tmp_path / "adapters"
    (tmp_path / "server.yaml").write_text(
        (tmp_path / "server.yaml").read_text()
        + f"inference: {{engines: {{support-tiny: {{external: {{url: 'http://127.0.0.1:9', adapters: {into}}}}}}}}}\n")
    served = load_server_config(tmp_path / "server.yaml")
    record = lora_job(served.config.storage, model="support-tiny")
    mirror = AdapterMirror(served.config.storage, "support-tiny", into)
    mirror.sync()
    app = create_app(served)
    try:
        route = app.state.service.gateway.route("acme", checkpoint_model(record, 8))
    finally:
        app.state.service.validator.shutdown()
        app.state.service.validator.pool.shutdown(wait=True)
    name, path = route.adapter
    assert name == f"{record.job_id}-step-8" and not Path(path).exists()  # 503 Retry-After until the next pass
    assert mirror.sync() == [str(Path(path).relative_to(into))]
    assert (Path(path) / ADAPTER_FILE).is_file() and (Path(path) / ADAPTER_CONFIG).is_file()
