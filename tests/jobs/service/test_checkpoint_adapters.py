"""Checkpoint models (OpenAI's ``ft:…:ckpt-step-N``): a DDP checkpoint's trained tensors become the PEFT adapter
folder vLLM loads (renamed in the safetensors header, no torch in the service), written once where `tunerun export
--checkpoint N` puts it, and the gateway asks the engine to load that folder. Against a real vLLM:
tests/e2e/test_inference.py."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tunerun.cluster.run_folder import (ADAPTER_FILE, CHECKPOINT_MANIFEST, RUN_INFO, SERVICE_RECORD, TRAINABLE,
                                        RunFolder, checkpoint_name, final_weights)
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.checkpoint_adapters import NoCheckpoint, NotAnAdapter, checkpoint_adapter
from tunerun.jobs.service.config import load_server_config

JOB = "ftjob-" + "c" * 24


def trained_run(storage, tiny_model_dir) -> tuple[RunFolder, dict]:
    """A succeeded LoRA job as the trainer leaves it: final/adapter (PEFT's save_pretrained) and a checkpoint at
    step 4 holding the trained tensors under their live names, as `DDPEngine.save_state` writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    run = RunFolder(storage, JOB)
    model.save_pretrained(run.local_path(final_weights("adapter")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # the checkpoint's weights differ from the final ones
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    folder = run.local_path(checkpoint_name(4))
    folder.mkdir(parents=True)
    save_file(trainable, str(folder / TRAINABLE))
    (folder / CHECKPOINT_MANIFEST).write_text(json.dumps({"step": 4, "files": []}))
    run.write_json(SERVICE_RECORD, {"job_id": JOB, "project": "acme", "model": "support-tiny",
                                    "created_at": time.time(), "request": {"training_file": "file-1"},
                                    "result_file": "file-2", "hyperparameters": {}, "seed": 0})
    run.write_json(RUN_INFO, {"run_id": JOB, "state": "succeeded", "target": "local"})
    return run, trainable


def test_a_checkpoint_becomes_the_adapter_peft_loads_with_the_same_weights(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, trainable = trained_run(str(tmp_path / "runs"), tiny_model_dir)
    folder = checkpoint_adapter(run, 4)
    assert folder == "exports/step-000004-adapter"
    written = run.local_path(f"{folder}/{ADAPTER_FILE}")
    assert set(load_file(str(written))) == {n.replace(".default.", ".") for n in trainable}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       run.local_path(folder))
    live = dict(loaded.named_parameters())
    assert all(torch.equal(live[name], value) for name, value in trainable.items())
    made = written.stat().st_mtime_ns
    assert checkpoint_adapter(run, 4) == folder and written.stat().st_mtime_ns == made  # made once
    with pytest.raises(NoCheckpoint):
        checkpoint_adapter(run, 8)
    (run.local_path(checkpoint_name(4)) / TRAINABLE).rename(run.local_path(checkpoint_name(4)) / "zero_shards")
    run.delete(folder)
    with pytest.raises(NotAnAdapter, match="DeepSpeed partitions.*tunerun export"):
        checkpoint_adapter(run, 4)


class RecordingEngine(BaseHTTPRequestHandler):
    """A vLLM that loads any adapter it is asked to and completes with one word; it records the load requests."""

    loads: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/v1/load_lora_adapter":
            self.loads.append(body)
            answer = {}
        else:
            answer = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                      "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_gateway_serves_a_checkpoint_model_from_its_adapter_folder(served, keys, tmp_path, tiny_model_dir):
    engine = ThreadingHTTPServer(("127.0.0.1", 0), RecordingEngine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    (tmp_path / "server.yaml").write_text(
        "storage: {uri: ./runs}\nmodels:\n  support-tiny: {job: support.yaml}\ninference: {engines: {support-tiny: "
        f"{{external: {{url: 'http://127.0.0.1:{engine.server_port}', adapters: /adapters}}}}}}}}\n")
    trained_run(served.config.storage, tiny_model_dir)
    model = f"ft:support-tiny:acme::{JOB}"
    try:
        with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
            def complete(name: str, key: str = keys["acme"]):
                return app.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": name, "prompt": "hi", "max_tokens": 4})

            answer = complete(f"{model}:ckpt-step-4")
            missing, other = complete(f"{model}:ckpt-step-8"), complete(f"{model}:ckpt-step-4", keys["other"])
    finally:
        engine.shutdown()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == f"{model}:ckpt-step-4"
    assert RecordingEngine.loads[-1] == {"lora_name": f"{JOB}-step-4",
                                         "lora_path": f"/adapters/{JOB}/exports/step-000004-adapter"}
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
