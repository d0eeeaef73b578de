"""What an engine pod's tunerun containers do (`tunerun.jobs.service.engine_files`), against a real S3 protocol
server on loopback (moto) and a local storage: the base model copied with the chat template its weights carry, and
the adapters of a model's succeeded jobs copied whole, once, exactly where the gateway tells the engine to read them.
vLLM itself cannot run in these tests (no GPU, not this venv): tests/e2e/test_inference.py serves adapters with it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tunerun.cluster.run_folder import ADAPTER_CONFIG, CHAT_TEMPLATE, RUN_INFO, SERVICE_RECORD, TOKENIZER_CONFIG, \
    RunFolder, final_weights
from tunerun.cluster.storage import backend_for
from tunerun.jobs.errors import StorageError
from tunerun.jobs.service import engine_files
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.engine_files import INCOMING, AdapterMirror, fetch_base
from tunerun.jobs.service.engines import adapter_key
from tunerun.jobs.service.fine_tuning import ServiceRecord
from tunerun.jobs.service.objects import fine_tuned_model
from tunerun.jobs.spec import StorageSpec
from tunerun.trainer.data.render import DEFAULT_CHAT_TEMPLATE

MODEL = "support-8b"
WEIGHTS = os.urandom(300_000)  # adapter_model.safetensors, as far as copying goes


def job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def make_job(storage: StorageSpec, state: str = "succeeded", model: str = MODEL, weights: str | None = "adapter",
             project: str = "acme") -> tuple[str, ServiceRecord]:
    """A job as the service leaves it: its record, run.json, and the final weights (``adapter`` or ``model``)."""
    ident = job_id()
    run = RunFolder(storage, ident)
    record = ServiceRecord(job_id=ident, project=project, model=model, created_at=time.time(),
                           request={"training_file": "file-1", "suffix": "tickets"}, result_file=f"file-{ident[6:]}",
                           hyperparameters={"n_epochs": 1}, seed=0)
    run.write_json(SERVICE_RECORD, vars(record))
    run.write_json(RUN_INFO, {"run_id": ident, "state": state, "target": "k8s"})
    if weights:
        folder = final_weights(weights)
        run.write_text(f"{folder}/{ADAPTER_CONFIG if weights == 'adapter' else 'config.json'}", '{"r": 8}')
        run.backend.put(f"{ident}/{folder}/adapter_model.safetensors", WEIGHTS)
    return ident, record


def set_state(storage: StorageSpec, ident: str, state: str) -> None:
    RunFolder(storage, ident).write_json(RUN_INFO, {"run_id": ident, "state": state, "target": "k8s"})


@pytest.fixture
def s3_storage(s3_server) -> StorageSpec:
    return StorageSpec(uri=f"s3://{s3_server.bucket(f'mirror-{uuid.uuid4().hex[:12]}')}/tunerun",
                       endpoint_url=s3_server.endpoint)


# ── the adapters ────────────────────────────────────────────────────────────────────────────────────────────

def test_a_succeeded_jobs_adapter_is_copied_once_and_only_the_models_loadable_adapters_are(s3_storage, tmp_path):
    into = tmp_path / "adapters"
    succeeded, _ = make_job(s3_storage)
    running, _ = make_job(s3_storage, state="running")
    full, _ = make_job(s3_storage, weights="model")  # a full fine-tune: the gateway does not load it as an adapter
    other, _ = make_job(s3_storage, model="other-model")
    failed, _ = make_job(s3_storage, state="failed", weights=None)
    mirror = AdapterMirror(s3_storage, MODEL, into)

    assert mirror.sync() == [succeeded]
    copied = into / adapter_key(succeeded)
    assert (copied / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((copied / ADAPTER_CONFIG).read_text()) == {"r": 8}
    assert sorted(p.name for p in into.iterdir()) == sorted([INCOMING, succeeded])  # no other job's folder
    assert list((into / INCOMING).iterdir()) == []
    stamp = (copied / "adapter_model.safetensors").stat().st_mtime_ns

    assert mirror.sync() == []  # nothing copied again
    assert (copied / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    set_state(s3_storage, running, "succeeded")
    assert mirror.sync() == [running]
    assert (into / adapter_key(running) / ADAPTER_CONFIG).is_file()
    for never in (full, other, failed):
        assert not (into / never).exists()
    # A new sidecar in the same pod (the emptyDir outlives a container) finds the copies and copies nothing.
    assert AdapterMirror(s3_storage, MODEL, into).sync() == []


def test_a_half_copied_adapter_never_shows_and_is_copied_whole_on_the_next_pass(s3_storage, tmp_path, monkeypatch,
                                                                                  caplog):
    into = tmp_path / "adapters"
    ident, _ = make_job(s3_storage)
    target = into / adapter_key(ident)
    mirror = AdapterMirror(s3_storage, MODEL, into)
    download, seen = mirror.backend.download_file, []

    def cut_off(key: str, path: Path) -> None:
        assert not target.exists()  # what vLLM could see while the copy runs: nothing
        seen.append(key)
        if len(seen) == 2:
            raise StorageError("the connection dropped")
        download(key, path)

    monkeypatch.setattr(mirror.backend, "download_file", cut_off)
    assert mirror.sync() == []
    assert len(seen) == 2 and not target.exists() and list((into / INCOMING).iterdir()) == []
    assert f"job {ident}: its adapter is not copied yet" in caplog.text and "the connection dropped" in caplog.text
    monkeypatch.setattr(mirror.backend, "download_file", download)
    assert mirror.sync() == [ident]
    assert (target / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_a_storage_that_cannot_be_listed_is_logged_and_the_mirror_goes_on(tmp_path, monkeypatch, caplog):
    storage = StorageSpec(uri=str(tmp_path / "runs"))
    ident, _ = make_job(storage)
    mirror, stop, listings = AdapterMirror(storage, MODEL, tmp_path / "adapters"), threading.Event(), []

    def flaky() -> list[str]:
        listings.append(1)
        if len(listings) == 1:
            raise StorageError("the store is down")
        stop.set()  # the second pass is the last
        return [ident]

    monkeypatch.setattr(mirror.jobs, "run_ids", flaky)
    mirror.run(every_s=0.01, stop=stop)
    assert "the store is down" in caplog.text and len(listings) == 2
    assert (tmp_path / "adapters" / adapter_key(ident) / ADAPTER_CONFIG).is_file()


def test_the_gateway_asks_the_engine_for_the_adapter_exactly_where_the_mirror_put_it(served, tmp_path):
    """The key has one owner (`adapter_key`): the gateway's path for an external engine is the mirror's folder."""
    into = tmp_path / "adapters"
    (tmp_path / "server.yaml").write_text(
        (tmp_path / "server.yaml").read_text()
        + f"inference: {{engines: {{support-tiny: {{external: {{url: 'http://127.0.0.1:9', adapters: {into}}}}}}}}}\n")
    served = load_server_config(tmp_path / "server.yaml")
    ident, record = make_job(served.config.storage, model="support-tiny")
    AdapterMirror(served.config.storage, "support-tiny", into).sync()
    app = create_app(served)
    try:
        route = app.state.service.gateway.route("acme", fine_tuned_model(record))
    finally:
        app.state.service.validator.shutdown()
        app.state.service.validator.pool.shutdown(wait=True)
    name, path = route.adapter
    assert name == ident and Path(path) == into / adapter_key(ident)
    assert (Path(path) / ADAPTER_CONFIG).is_file()


# ── the base model ──────────────────────────────────────────────────────────────────────────────────────────

def upload_model(storage: StorageSpec, prefix: str, files: dict[str, bytes]) -> StorageSpec:
    backend = backend_for(storage)
    for name, data in files.items():
        backend.put(f"{prefix}/{name}", data)
    return storage.model_copy(update={"uri": f"{storage.uri}/{prefix}"})


def test_the_base_model_is_copied_with_the_chat_template_its_weights_carry(s3_storage, tmp_path):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS,
             TOKENIZER_CONFIG: json.dumps({"chat_template": "{{ messages[0].content }}"}).encode(),
             "original/params.json": b"{}"}
    model = upload_model(s3_storage, "models/tokenizer-template", files)
    base = fetch_base(model, tmp_path / "base")
    assert {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} == set(files)
    assert (base / "model.safetensors").read_bytes() == WEIGHTS
    assert (tmp_path / "base" / "chat-template.jinja").read_text() == "{{ messages[0].content }}"

    saved = upload_model(s3_storage, "models/saved-template", {**files, CHAT_TEMPLATE: b"{{ 'saved' }}"})
    fetch_base(saved, tmp_path / "saved")
    assert (tmp_path / "saved" / "chat-template.jinja").read_text() == "{{ 'saved' }}"

    none = upload_model(s3_storage, "models/no-template", {"config.json": b"{}", TOKENIZER_CONFIG: b"{}"})
    fetch_base(none, tmp_path / "none")
    assert (tmp_path / "none" / "chat-template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE.read_text()


def test_the_init_container_command_copies_the_base_and_a_restart_keeps_the_copy(s3_storage, tmp_path):
    model = upload_model(s3_storage, "models/tiny", {"config.json": b"{}", "model.safetensors": WEIGHTS})
    command = [sys.executable, "-m", "tunerun.jobs.service.engine_files", "base", "--storage",
               model.model_dump_json(exclude_defaults=True), "--into", str(tmp_path / "base")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "base" / "model" / "model.safetensors").read_bytes() == WEIGHTS
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "is there already" in again.stderr
    missing = subprocess.run(command[:5] + [json.dumps({"uri": f"{s3_storage.uri}/models/nothing",
                                                          "endpoint_url": s3_storage.endpoint_url})]
                             + command[6:-1] + [str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no files there" in missing.stderr


def test_the_slurm_script_writes_the_template_of_a_local_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CHAT_TEMPLATE).write_text("{{ 'beside the weights' }}")
    assert engine_files.main(["chat-template", str(tmp_path / "model"), "--out", str(tmp_path / "t.jinja")]) == 0
    assert (tmp_path / "t.jinja").read_text() == "{{ 'beside the weights' }}"
