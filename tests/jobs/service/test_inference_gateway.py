"""The inference gateway without an engine: server.yaml's inference block, what is refused before the engine,
and OpenAI's chat shapes made from vLLM's completions. Against a real vLLM: tests/e2e/test_inference.py."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tunerun.cluster.run_folder import ADAPTER_CONFIG, RUN_INFO, SERVICE_RECORD, RunFolder, final_weights
from tunerun.jobs.errors import SpecError
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.chat import ChatTemplate
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.engines import ADAPTER_RETRY_S, ManagedEngine, ManagedEngineSettings, Unavailable, \
    free_port, release_port
from tunerun.jobs.service.full_engines import FullFineTuneEngines, FullFineTuneSettings
from tunerun.jobs.service.inference import ChatRequest, Route, as_chat, as_chat_chunk, completion_body

MANAGED = ("inference:\n  engines:\n    {name}: {{managed: {{python: /nonexistent/python, port_min: 9100, "
           "port_max: 9140}}}}\n")


def server_yaml(tmp_path, inference: str) -> None:
    (tmp_path / "server.yaml").write_text("storage: {uri: ./runs}\nmodels:\n  support-tiny: {job: support.yaml}\n"
                                          + inference)


def test_an_engine_for_a_model_not_in_the_catalog_is_named_with_a_suggestion(served, tmp_path):
    server_yaml(tmp_path, MANAGED.format(name="support-tiyn"))
    with pytest.raises(SpecError) as caught:
        load_server_config(tmp_path / "server.yaml")
    assert "line 6     inference.engines.support-tiyn: 'support-tiyn' is not a model under models: — did you " \
           "mean 'support-tiny'?" in str(caught.value)
    server_yaml(tmp_path, "inference: {engines: {support-tiny: {managed: {}, external: {url: 'http://v:8000', "
                          "adapters: /mnt}}}}\n")
    with pytest.raises(SpecError, match="give either managed"):
        load_server_config(tmp_path / "server.yaml")
    server_yaml(tmp_path, "inference: {engines: {support-tiny: {external: {url: 'vllm:8000', adapters: /mnt}}}}\n")
    with pytest.raises(SpecError, match="expected the engine's HTTP address"):
        load_server_config(tmp_path / "server.yaml")


def test_a_managed_engine_runs_vllm_from_its_own_venv_with_runtime_lora(monkeypatch):
    settings = ManagedEngineSettings(python="/opt/vllm/bin/python", max_loras=8, max_lora_rank=64, kv_cache_gib=2,
                                     extra_args=["--tensor-parallel-size", "2"])
    engine = ManagedEngine("support-8b", settings, "/models/llama-8b", "/tmp/logs")
    command = engine.command(8123)
    assert command[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    assert "--model /models/llama-8b --served-model-name support-8b" in joined and "--port 8123" in joined
    assert "--enable-lora --max-loras 8 --max-lora-rank 64" in joined
    assert command[-2:] == ["--tensor-parallel-size", "2"]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "GITHUB_TOKEN",
                 "DB_PASSWORD", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, "secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    env = engine.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "secret" not in env.values()  # the engine gets no credential of the server's
    assert env["OMP_NUM_THREADS"] == "4" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["PATH"] == os.environ["PATH"]


def test_engines_started_side_by_side_get_different_ports():
    """vLLM binds its port only seconds after it starts: a port given to one engine is not given to another until
    its process has ended (two engines on one port served each other's requests)."""
    first, second = free_port(9200, 9210), free_port(9200, 9210)
    assert first != second
    release_port(first)
    assert free_port(9200, 9210) == first
    for port in (first, second):
        release_port(port)


def test_an_engine_that_cannot_start_is_a_503_with_retry_after_and_shows_in_healthz(served, keys, tmp_path):
    server_yaml(tmp_path, MANAGED.format(name="support-tiny"))
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        answer = app.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"},
                          json={"model": "support-tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
        assert answer.json()["error"]["code"] == "engine_unavailable"
        engine = app.get("/healthz").json()["engines"]["support-tiny"]
        assert engine["kind"] == "managed" and engine["state"] in ("starting", "restarting")
        models = app.get("/v1/models", headers={"Authorization": f"Bearer {keys['acme']}"}).json()["data"]
        assert [m["tunerun"]["callable"] for m in models] == [False]


def test_a_managed_engine_of_a_model_on_s3_is_refused_when_the_server_starts_not_when_it_renders(served, tmp_path):
    """`tunerun serve render` runs such an engine in a pod that copies the model; `tunerun serve` here cannot."""
    (tmp_path / "support.yaml").write_text((tmp_path / "support.yaml").read_text().replace(
        str(served.templates["support-tiny"].model.path), "s3://models/tiny"))
    server_yaml(tmp_path, MANAGED.format(name="support-tiny"))
    config = load_server_config(tmp_path / "server.yaml")
    with pytest.raises(SpecError, match="model.path is on S3.*tunerun serve render"):
        create_app(config)


class RefusingEngine(BaseHTTPRequestHandler):
    """A vLLM that cannot find the adapter it is asked to load (as when its copy of the storage lags behind)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps({"object": "error", "message": "No adapter found for /adapters/x", "code": 404}).encode()
        self.send_response(404 if self.path == "/v1/load_lora_adapter" else 500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_adapter_the_engine_cannot_load_yet_is_a_503_with_retry_after(served, keys, tmp_path):
    engine = ThreadingHTTPServer(("127.0.0.1", 0), RefusingEngine)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    server_yaml(tmp_path, "inference: {engines: {support-tiny: {external: {url: 'http://127.0.0.1:"
                          f"{engine.server_port}', adapters: /adapters}}}}}}}}\n")
    job = "ftjob-" + "a" * 24
    run = RunFolder(served.config.storage, job)
    run.write_json(SERVICE_RECORD, {"job_id": job, "project": "acme", "model": "support-tiny",
                                    "created_at": time.time(), "request": {"training_file": "file-1"},
                                    "result_file": "file-2", "hyperparameters": {}, "seed": 0})
    run.write_json(RUN_INFO, {"run_id": job, "state": "succeeded", "target": "local"})
    run.write_text(f"{final_weights('adapter')}/{ADAPTER_CONFIG}", "{}")
    try:
        with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
            answer = app.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"},
                              json={"model": f"ft:support-tiny:acme::{job}",
                                    "messages": [{"role": "user", "content": "hi"}]})
    finally:
        engine.shutdown()
    assert answer.status_code == 503 and answer.headers["retry-after"] == str(ADAPTER_RETRY_S)
    error = answer.json()["error"]
    assert error["code"] == "engine_unavailable" and "could not load the adapter (404" in error["message"]
    assert "/adapters/" not in error["message"]  # the engine's paths are the server's, not the tenant's


def test_models_and_parameters_the_engine_would_refuse_late_are_refused_first(served, keys, tmp_path):
    server_yaml(tmp_path, "inference:\n  max_n: 2\n" + MANAGED.format(name="support-tiny")[len("inference:\n"):])
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        def chat(**body):
            body = {"model": "support-tiny", "messages": [{"role": "user", "content": "hi"}]} | body
            return app.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"}, json=body)

        assert chat(model="gpt-4o").json()["error"]["code"] == "model_not_found"
        assert chat(model="ft:support-tiny:other::ftjob-" + "0" * 24).status_code == 404
        assert chat(n=3).json()["error"]["param"] == "n"
        assert chat(max_tokens=100000).json()["error"]["code"] == "context_length_exceeded"
        assert chat(messages=[]).status_code == 400
        assert chat(messages=[{"role": "wizard", "content": "x"}]).status_code == 400
        no_key = app.post("/v1/chat/completions", json={"model": "support-tiny", "messages": []})
        assert no_key.status_code == 401


def route(template: str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}A:") -> Route:
    return Route("ft:support-tiny:acme::ftjob-1", None, "ftjob-1", None, ChatTemplate(template, {}))


def test_a_chat_request_becomes_the_rendered_completion_with_its_sampling_parameters():
    request = ChatRequest.model_validate({
        "model": "ft:support-tiny:acme::ftjob-1", "temperature": 0, "max_completion_tokens": 12, "stop": ["\n"],
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Where is "},
                                                  {"type": "text", "text": "it?"}]}]})
    body = completion_body(request, route())
    assert body == {"model": "ftjob-1", "prompt": "system: Be brief.\nuser: Where is it?\nA:", "n": 1,
                    "stream": False, "max_tokens": 12, "temperature": 0, "stop": ["\n"]}
    for refused in ({"logprobs": True}, {"response_format": {"type": "json_object"}}, {"tool_choice": "required"}):
        with pytest.raises(Exception, match="not supported") as caught:
            completion_body(ChatRequest.model_validate(request.model_dump() | refused), route())
        assert caught.value.status == 400
    with pytest.raises(Exception, match="only text content parts"):
        completion_body(ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), route())


def test_completions_come_back_in_chats_shape_whole_and_streamed():
    answer = {"id": "cmpl-abc", "object": "text_completion", "created": 7, "model": "ft:x",
              "choices": [{"index": 0, "text": "category: billing", "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}}
    chat = as_chat(answer)
    assert chat["id"] == "chatcmpl-abc" and chat["object"] == "chat.completion" and chat["usage"]["total_tokens"] == 24
    assert chat["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "category: billing"},
                                "finish_reason": "stop", "logprobs": None}]
    opened: set[int] = set()
    first = as_chat_chunk({"id": "cmpl-abc", "created": 7, "model": "ft:x",
                           "choices": [{"index": 0, "text": "cat", "finish_reason": None}]}, opened)
    second = as_chat_chunk({"id": "cmpl-abc", "created": 7, "model": "ft:x",
                            "choices": [{"index": 0, "text": "egory", "finish_reason": "length"}]}, opened)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "cat"}
    assert second["choices"][0]["delta"] == {"content": "egory"} and second["choices"][0]["finish_reason"] == "length"
    usage = as_chat_chunk({"id": "cmpl-abc", "model": "ft:x", "choices": [], "usage": {"total_tokens": 9}}, opened)
    assert usage["choices"] == [] and usage["usage"] == {"total_tokens": 9}


# ── full fine-tunes: an engine of their own ─────────────────────────────────────────────────────────────────

def succeeded_job(served, kind: str = "model", storage=None) -> str:
    """A succeeded job of acme's in the storage whose final weights are ``final/<kind>``."""
    job = "ftjob-" + ("f" if kind == "model" else "a") * 24
    run = RunFolder(storage or served.config.storage, job)
    run.write_json(SERVICE_RECORD, {"job_id": job, "project": "acme", "model": "support-tiny",
                                    "created_at": time.time(), "request": {"training_file": "file-1"},
                                    "result_file": "file-2", "hyperparameters": {}, "seed": 0})
    run.write_json(RUN_INFO, {"run_id": job, "state": "succeeded", "target": "local"})
    run.write_text(f"{final_weights(kind)}/{ADAPTER_CONFIG if kind == 'adapter' else 'config.json'}", "{}")
    return job


def test_full_fine_tunes_settings_are_checked_with_the_field_named(served, tmp_path):
    server_yaml(tmp_path, MANAGED.format(name="support-tiny") + "  full_fine_tunes: {max_engine: 2}\n")
    with pytest.raises(SpecError, match="inference.full_fine_tunes.max_engine.*did you mean 'max_engines'"):
        load_server_config(tmp_path / "server.yaml")
    server_yaml(tmp_path, MANAGED.format(name="support-tiny") + "  full_fine_tunes: {idle_stop_s: 0}\n")
    with pytest.raises(SpecError, match="inference.full_fine_tunes.idle_stop_s"):
        load_server_config(tmp_path / "server.yaml")


def test_a_full_fine_tune_is_refused_by_name_where_no_engine_of_its_own_can_start(served, keys, tmp_path):
    """An external engine cannot start processes; without inference.full_fine_tunes the server starts none; a full
    fine-tune's checkpoints are not served. Each is a 400 that names what to change."""
    job = succeeded_job(served)
    model = f"ft:support-tiny:acme::{job}"

    def chat(app, called=model):
        return app.post("/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"},
                        json={"model": called, "messages": [{"role": "user", "content": "hi"}]})

    server_yaml(tmp_path, "inference: {full_fine_tunes: {}, engines: {support-tiny: {external: {url: "
                          "'http://127.0.0.1:9', adapters: /adapters}}}}\n")
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        error = chat(app).json()["error"]
    assert error["code"] == "model_not_served" and error["param"] == "model"
    assert "inference.engines.support-tiny.external" in error["message"] and "managed engine" in error["message"]
    server_yaml(tmp_path, MANAGED.format(name="support-tiny"))
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        error = chat(app).json()["error"]
        assert error["code"] == "model_not_served" and "inference.full_fine_tunes" in error["message"]
        error = chat(app, f"{model}:ckpt-step-4").json()["error"]
        assert error["code"] == "model_not_served" and "checkpoints of a full fine-tune" in error["message"]


def test_a_full_fine_tune_starts_its_engine_on_its_first_request_and_healthz_shows_it(served, keys, tmp_path):
    job, adapter_job = succeeded_job(served), succeeded_job(served, "adapter")
    server_yaml(tmp_path, MANAGED.format(name="support-tiny") + "  full_fine_tunes: {max_engines: 1}\n")
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        auth = {"Authorization": f"Bearer {keys['acme']}"}
        assert job not in app.get("/healthz").json()["engines"]  # none runs before its first request
        answer = app.post("/v1/chat/completions", headers=auth, json={
            "model": f"ft:support-tiny:acme::{job}", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
        assert answer.json()["error"]["code"] == "engine_unavailable" and "started it" in answer.json()["error"][
            "message"]
        engine = app.get("/healthz").json()["engines"][job]
        assert engine["kind"] == "full_fine_tune" and engine["base"] == "support-tiny" and engine["starts"] == 1
        assert engine["state"] in ("starting", "restarting")  # /nonexistent/python never serves
        models = {m["id"]: m["tunerun"]["callable"] for m in app.get("/v1/models", headers=auth).json()["data"]}
        assert models[f"ft:support-tiny:acme::{job}"] is False and f"ft:support-tiny:acme::{adapter_job}" in models
    # the server stopped: so did the engine it started
    assert app.app.state.service.gateway.full.health()[job]["state"] == "stopped"


STAND_IN_VLLM = """
import argparse, json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
parser.add_argument("--model")
parser.add_argument("--enable-lora", action="store_true")
options, _ = parser.parse_known_args()
loaded = {}  # adapter name -> the folder it was loaded from


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # /health, and /v1/models: the loaded adapters, as vLLM lists them
        self.answer({"data": [{"id": name, "root": path} for name, path in loaded.items()]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/v1/load_lora_adapter":
            if not options.enable_lora:  # as vLLM refuses it
                return self.answer({"object": "error", "message": "LoRA is not enabled"}, 400)
            loaded[body["lora_name"]] = body["lora_path"]
            return self.answer({})
        # a completion says which weights and which adapter made it
        made_by = {"weights": options.model, "model": body["model"], "adapter": loaded.get(body["model"])}
        self.answer({"choices": [{"index": 0, "text": json.dumps(made_by), "finish_reason": "stop"}]})

    def answer(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", options.port), Handler).serve_forever()
"""


def stand_in_vllm(root) -> str:
    """A folder to put on PYTHONPATH where ``python -m vllm.entrypoints.openai.api_server`` is a small HTTP server
    answering /health and /v1/completions: real processes, ports and signals for the engines' lifecycle, in a
    second each (tests/e2e/test_inference.py runs the real vLLM)."""
    package = root / "stand-in" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STAND_IN_VLLM)
    return str(root / "stand-in")


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def listening(port: int) -> bool:
    """Whether something accepts connections on the port (a bind test would fail on TIME_WAIT sockets)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_full_fine_tune_engines_make_room_for_a_new_one_and_stop_when_idle(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", stand_in_vllm(tmp_path))
    base = ManagedEngineSettings(python=sys.executable, port_min=9150, port_max=9190, kv_cache_gib=4,
                                 gpu_memory_utilization=0.9)
    pool = FullFineTuneEngines(FullFineTuneSettings(max_engines=1, idle_stop_s=4, gpu_memory_utilization=0.3))
    pool.start()
    try:
        first, second = (pool.engine(job, "support-tiny", base, lambda job=job: str(tmp_path / job), tmp_path / "logs")
                         for job in ("ftjob-first", "ftjob-second"))
        with pytest.raises(Unavailable, match="this request started it") as starting:
            first.begin()
        assert starting.value.retry_after > 0
        wait_until(lambda: first.state == "ready")
        command = " ".join(first.command(9150))
        assert f"--model {tmp_path / 'ftjob-first'} --served-model-name ftjob-first" in command
        assert "--gpu-memory-utilization 0.3" in command  # its own share
        assert first.environment()["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the catalog model's engine's
        first.begin()  # a request in flight: the one engine allowed is in use
        with pytest.raises(Unavailable, match=r"at most 1 engine\(s\).*inference.full_fine_tunes.max_engines"):
            second.begin()
        assert second.state == "stopped"
        first.release()
        pid, port = first.health()["pid"], first.port
        with pytest.raises(Unavailable, match="started it"):  # the first is idle now: stopped to make room
            second.begin()
        wait_until(lambda: first.state == "stopped" and second.state == "ready")
        assert process_gone(pid) and pool.health()["ftjob-first"]["pid"] is None
        assert second.port == port or not listening(port)  # the second may take the port the first freed
        second.begin()
        second.release()
        pid, port = second.health()["pid"], second.port
        wait_until(lambda: second.state == "stopped", timeout=20)  # 4 s without a request
        assert second.idle_s() >= 4 and process_gone(pid) and not listening(port)
        assert pool.health()["ftjob-second"]["state"] == "stopped"
        with pytest.raises(Unavailable, match="started it"):  # the next request starts it again
            second.begin()
        assert pool.health()["ftjob-second"]["starts"] == 2
        wait_until(lambda: second.state == "ready")
    finally:
        pool.close()
    assert first.state == second.state == "stopped" and process_gone(second._process.pid)


def test_a_full_fine_tune_on_s3_is_copied_to_this_host_once_as_its_engine_starts(served, s3_server, tmp_path,
                                                                                monkeypatch):
    from tunerun.jobs.service.keys import KeyStore
    from tunerun.jobs.spec import StorageSpec

    storage = StorageSpec(uri=f"s3://{s3_server.bucket('full-fine-tunes')}/tunerun", endpoint_url=s3_server.endpoint)
    job = succeeded_job(served, storage=storage)
    RunFolder(storage, job).write_bytes(f"{final_weights('model')}/model.safetensors", b"weights" * 1000)
    monkeypatch.setenv("PYTHONPATH", stand_in_vllm(tmp_path))
    monkeypatch.setenv("TUNERUN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "server.yaml").write_text(
        f"storage: {{uri: '{storage.uri}', endpoint_url: '{storage.endpoint_url}'}}\nmodels:\n  support-tiny: {{job: "
        f"support.yaml}}\ninference:\n  full_fine_tunes: {{}}\n  engines:\n    support-tiny: {{managed: {{python: "
        f"{sys.executable}, port_min: 9160, port_max: 9190}}}}\n")
    key = KeyStore(storage).create("acme")[1]
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        def chat():
            return app.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
                "model": f"ft:support-tiny:acme::{job}", "messages": [{"role": "user", "content": "hi"}]})

        render = app.post("/v1/chat/completions/render", headers={"Authorization": f"Bearer {key}"}, json={
            "model": f"ft:support-tiny:acme::{job}", "messages": [{"role": "user", "content": "hi"}]})
        assert render.status_code == 200 and not (tmp_path / "cache" / "serve" / "models").exists()  # no copy yet
        assert chat().status_code == 503
        wait_until(lambda: app.get("/healthz").json()["engines"][job]["state"] == "ready")
        copy = tmp_path / "cache" / "serve" / "models" / job
        assert (copy / "model.safetensors").read_bytes() == b"weights" * 1000 and (copy / "config.json").is_file()
        answer = chat().json()  # the stand-in answers with the folder it was started on
        assert json.loads(answer["choices"][0]["message"]["content"])["weights"] == str(copy)


def test_a_full_fine_tunes_engine_is_the_catalog_engines_command_with_its_weights_and_lora_on():
    """Adapters trained on a full fine-tune are loaded into its engine, so it runs with LoRA on, as the catalog
    model's does; the catalog engine's LoRA options (which vLLM refuses without --enable-lora) hold for it too."""
    lora_options = ["--max-cpu-loras", "16", "--lora-dtype", "bfloat16", "--enable-lora"]
    base = ManagedEngineSettings(python="/opt/vllm/bin/python", max_loras=8, max_lora_rank=32,
                                 extra_args=["--tensor-parallel-size", "2", *lora_options])
    catalog = ManagedEngine("support-8b", base, "/models/llama-8b", "/tmp/logs")
    pool = FullFineTuneEngines(FullFineTuneSettings())
    own = pool.engine("ftjob-full", "support-8b", base, lambda: "/runs/ftjob-full/final/model", "/tmp/logs")
    own.model_path = own.weights()  # what its start does
    command = own.command(8123)
    expected = catalog.command(8123)
    for name, mine in (("--model", "/runs/ftjob-full/final/model"), ("--served-model-name", "ftjob-full")):
        at = expected.index(name) + 1
        expected[at] = mine
    assert command == expected
    assert " ".join(command).endswith("--enable-lora --max-loras 8 --max-lora-rank 32 --dtype bfloat16 "
                                      "--max-model-len 2048 --tensor-parallel-size 2 " + " ".join(lora_options))
    # the process started is the launcher, which starts that command and dies with this server
    launched = own.launch_command(8123)
    assert launched[:2] == ["/opt/vllm/bin/python", "-c"] and launched[3] == str(os.getpid())
    assert launched[5:] == command[1:]


def succeed(served, job_id: str, weights: str, files: dict[str, str]) -> None:
    """What the trainer leaves when a job succeeds: its final weights (``final/<weights>``) and run.json."""
    from tunerun.cluster.runs import RunState, record_outcome

    run = RunFolder(served.config.storage, job_id)
    for name, text in files.items():
        run.write_text(f"{final_weights(weights)}/{name}", text)
    record_outcome(run, RunState.SUCCEEDED)


def test_an_adapter_trained_on_a_full_fine_tune_is_served_on_that_fine_tunes_engine(served, keys, tmp_path,
                                                                                    monkeypatch):
    """A LoRA job created from a full fine-tune's ``ft:`` model trained on its final/model (the job.yaml says so):
    its adapter is loaded into the full fine-tune's own engine, never into the catalog model's, whose weights it
    was not trained on. Where that engine cannot run, the request is refused by name."""
    from service_calls import TICKETS, client, upload

    from tunerun.cluster import targets
    from tunerun.jobs.loader import load_job_text
    from tunerun.jobs.service.config import UPLOAD_PLACEHOLDER

    monkeypatch.setenv("PYTHONPATH", stand_in_vllm(tmp_path))
    server_yaml(tmp_path, f"inference:\n  full_fine_tunes: {{max_engines: 1}}\n  engines:\n    support-tiny: "
                          f"{{managed: {{python: {sys.executable}, port_min: 9230, port_max: 9260}}}}\n")
    config = load_server_config(tmp_path / "server.yaml")

    def retemplate(kind: str) -> None:  # the admin's catalog spec trains full fine-tunes, then LoRA adapters
        text = config.texts["support-tiny"].replace("method: {kind: lora}", f"method: {{kind: {kind}}}")
        config.texts["support-tiny"] = text
        config.templates["support-tiny"] = load_job_text(text, "support.yaml", [f"data.train={UPLOAD_PLACEHOLDER}"],
                                                         model=targets.job_model())

    app = create_app(config)
    api = client(app, keys["acme"])  # no lifespan yet: the jobs are created, not started
    tickets = upload(app, keys["acme"], "acme", TICKETS)
    retemplate("full")
    full = api.fine_tuning.jobs.create(model="support-tiny", training_file=tickets.id, suffix="full")
    succeed(served, full.id, "model", {"config.json": "{}"})
    full_model = api.fine_tuning.jobs.retrieve(full.id).fine_tuned_model
    retemplate("lora")
    on_full = api.fine_tuning.jobs.create(model=full_model, training_file=tickets.id, suffix="on-full")
    succeed(served, on_full.id, "adapter", {ADAPTER_CONFIG: "{}"})
    model = api.fine_tuning.jobs.retrieve(on_full.id).fine_tuned_model
    runs = tmp_path / "runs"
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    with TestClient(app) as served_app:
        def chat():
            return served_app.post("/v1/chat/completions", headers=auth,
                                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})

        def engines() -> dict:
            return served_app.get("/healthz").json()["engines"]

        starting = chat()  # the full fine-tune's engine was not running: this request started it
        assert starting.status_code == 503 and "started it" in starting.json()["error"]["message"]
        assert engines()[full.id]["kind"] == "full_fine_tune"
        wait_until(lambda: engines()[full.id]["state"] == "ready" and engines()["support-tiny"]["state"] == "ready")
        listed = {m["id"]: m["tunerun"]["callable"] for m in served_app.get("/v1/models", headers=auth).json()["data"]}
        assert listed[model] is listed[full_model] is True
        answer = chat()
        assert answer.status_code == 200, answer.text
        made_by = json.loads(answer.json()["choices"][0]["message"]["content"])
        assert made_by["model"] == on_full.id  # the adapter's name in the engine: the job's id
        assert Path(made_by["weights"]).resolve() == (runs / full.id / "final" / "model").resolve()
        assert Path(made_by["adapter"]).resolve() == (runs / on_full.id / "final" / "adapter").resolve()
        loaded = {name: [m["id"] for m in httpx.get(engine["url"] + "/v1/models").json()["data"]]
                  for name, engine in engines().items()}
        assert loaded == {full.id: [on_full.id], "support-tiny": []}  # the catalog engine was never given it
    # the catalog model's engine is external: this server cannot start the full fine-tune's engine, nor serve
    # its adapters
    server_yaml(tmp_path, "inference: {full_fine_tunes: {}, engines: {support-tiny: {external: {url: "
                          "'http://127.0.0.1:9', adapters: /adapters}}}}\n")
    with TestClient(create_app(load_server_config(tmp_path / "server.yaml"))) as app:
        error = app.post("/v1/chat/completions", headers=auth, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]}).json()["error"]
    assert error["code"] == "model_not_served" and error["param"] == "model"
    assert f"an adapter trained on the full fine-tune {full_model}" in error["message"]
    assert "inference.engines.support-tiny.external" in error["message"]
