"""Full fine-tunes' own engines on Kubernetes (`tunerun.jobs.service.k8s_engines`): what `tunerun serve render` writes
for them, the Deployment and Service the server renders for one fine-tune (validated against the core Kubernetes
schemas, strict), and the pool's behaviour — created by the first request, 503 until the Service answers /health,
deleted when idle, at most ``max_engines``, adopted or deleted by a server that starts again.

No Kubernetes API server can run here. What is faked is only the Kubernetes API boundary: `FakeKubeApi` stands in
for `tunerun.cluster.k8s.KubeApi`'s four calls for Deployments and Services and keeps the objects as the API server
would (the wrapper's own HTTP exchange is tested against a fake API server in
tests/cluster/test_k8s_served_objects.py). Everything else is real: the server's configuration as the pod loads it
from the rendered ConfigMap, the rendered manifests, the pool, and the ready-check, which asks a real HTTP server on
loopback (a stand-in for the engines' Services, each at its own path) for /health, as it would ask the Service.
"""
from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from tunerun.cluster.run_folder import RUN_INFO, SERVICE_RECORD, RunFolder, final_weights
from tunerun.jobs.errors import SpecError, TargetError
from tunerun.jobs.service import k8s_engines
from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.deploy import FULL_ENGINE_RULES, full_engine_name, render_k8s
from tunerun.jobs.service.engines import Unavailable
from tunerun.jobs.service.keys import KeyStore
from tunerun.jobs.service.k8s_engines import FULL_COMPONENT, JOB_LABEL, SPEC_ANNOTATION, KubernetesEngines

SPEC = """name: support
model: {path: "s3://models/llama-8b/"}
method: {kind: full}
resources: {gpus_per_worker: 1, workers_per_node: 4, gpu_memory_gb: 80}
"""
SERVER = """storage: {{uri: "{storage}", endpoint_url: "{endpoint}"}}
target: k8s
targets:
  k8s: {{namespace: ml-jobs, image: registry.example.com/tunerun:0.1.0, s3_secret: s3-credentials}}
models:
  llama-8b: {{job: "{spec}"}}
  qwen-7b: {{job: "{spec}"}}
inference:
  engines:
    llama-8b:
      managed: {{max_model_len: 4096, gpu_memory_utilization: 0.9, start_timeout_s: {start_timeout_s},
                k8s: {{gpus: 1, memory: 40Gi, node_selector: {{gpu: h100}}}}}}
    qwen-7b: {{external: {{url: "http://vllm-qwen:8000", adapters: /mnt/runs}}}}
  full_fine_tunes:
    max_engines: {max_engines}
    idle_stop_s: {idle_stop_s}
    gpu_memory_utilization: 0.45
    kubernetes: {{gpus: 2, memory: 80Gi}}
"""
NAMESPACE = "ml-jobs"
JOB_A, JOB_B, JOB_C = (f"ftjob-{letter * 24}" for letter in "abc")


def pod_served(root, storage: str = "s3://training/tunerun", endpoint: str = "http://minio.storage:9000",
               max_engines: int = 1, idle_stop_s: float = 600, start_timeout_s: float = 900):
    """The server's configuration as its pod loads it: server.yaml rendered by `tunerun serve render`, read from
    the ConfigMap's files written where the pod mounts them."""
    operator = root / "operator"
    operator.mkdir(exist_ok=True)
    (operator / "spec.yaml").write_text(SPEC)
    (operator / "server.yaml").write_text(SERVER.format(storage=storage, endpoint=endpoint, max_engines=max_engines,
                                                        idle_stop_s=idle_stop_s, start_timeout_s=start_timeout_s,
                                                        spec=operator / "spec.yaml"))
    rendered = list(yaml.safe_load_all(render_k8s(load_server_config(operator / "server.yaml"))))
    mounted = root / "etc-tunerun"
    mounted.mkdir(exist_ok=True)
    for key, text in rendered[3]["data"].items():
        (mounted / key).write_text(text.replace("/etc/tunerun", str(mounted)))
    return load_server_config(mounted / "server.yaml"), rendered


class FakeKubeApi:
    """`tunerun.cluster.k8s.KubeApi`'s calls for Deployments and Services, answered as the API server would: a
    create of an existing name is None, objects get a uid and a creation time, lists filter by one label."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.refuse: str | None = None  # a TargetError every call raises (RBAC, an unreachable API server)
        self._created = 0
        self.add("Deployment", {"metadata": {"name": "tunerun-serve", "namespace": NAMESPACE}})  # the server's own

    def add(self, kind: str, document: dict) -> dict:
        self._created += 1
        created = copy.deepcopy(document) | {"kind": kind}
        created["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=f"2026-12-02T10:{self._created:02d}:00Z")
        self.objects[(kind, created["metadata"]["namespace"], created["metadata"]["name"])] = created
        return created

    def _call(self, verb: str, kind: str, name: str) -> None:
        self.calls.append((verb, kind, name))
        if self.refuse:
            raise TargetError(self.refuse)

    def create_served(self, document: dict) -> dict | None:
        metadata = document["metadata"]
        self._call("create", document["kind"], metadata["name"])
        if (document["kind"], metadata["namespace"], metadata["name"]) in self.objects:
            return None
        return self.add(document["kind"], document)

    def list_served(self, kind: str, namespace: str, selector: str) -> list[dict]:
        self._call("list", kind, selector)
        key, _, value = selector.partition("=")
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                if k == kind and ns == namespace and (o["metadata"].get("labels") or {}).get(key) == value]

    def get_served(self, kind: str, namespace: str, name: str) -> dict | None:
        self._call("get", kind, name)
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def delete_served(self, kind: str, namespace: str, name: str) -> bool:
        self._call("delete", kind, name)
        return self.objects.pop((kind, namespace, name), None) is not None

    def engines(self) -> set[tuple[str, str]]:
        return {(kind, name) for kind, _, name in self.objects if name.startswith("tunerun-full-")}


class StandInServices:
    """The engines' Services on loopback, each at /<its name>: /health answers 200 once the test says it serves,
    and /v1/completions answers as vLLM does."""

    def __init__(self):
        self.serving: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                name, _, path = self.path.strip("/").partition("/")
                self._answer(200 if path == "health" and name in outer.serving else 503, {})

            def do_POST(self):
                name, _, path = self.path.strip("/").partition("/")
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self._answer(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "text": f"from {name}", "finish_reason": "stop",
                                                "logprobs": None}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url_of(self, name: str, namespace: str) -> str:
        assert namespace == NAMESPACE
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def services(monkeypatch):
    monkeypatch.setattr(k8s_engines, "STARTING_POLL_S", 0.05)
    stand_in = StandInServices()
    yield stand_in
    stand_in.close()


@pytest.fixture
def pools(services, tmp_path):
    """Make pools over one fake API (a server, then the one that starts after it); each is closed at the end."""
    api, made = FakeKubeApi(), []

    def make(**settings) -> KubernetesEngines:
        served, _ = pod_served(tmp_path, **settings)
        pool = KubernetesEngines(served.config.inference.full_fine_tunes, served.config, api=lambda: api,
                                 service_url=services.url_of, watch_s=0.1)
        made.append(pool)
        return pool

    make.api = api
    yield make
    for pool in made:
        pool.close()


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def full(name: str) -> tuple[set, ...]:
    return {("Deployment", name), ("Service", name)}


# ── what `tunerun serve render` writes, and what the server renders ─────────────────────────────────────────

def test_render_writes_the_setting_into_the_configmap_and_the_role_gains_only_what_the_engines_need(tmp_path):
    served, rendered = pod_served(tmp_path)
    kubernetes = served.config.inference.full_fine_tunes.kubernetes
    assert kubernetes.namespace == NAMESPACE and kubernetes.owner == rendered[4]["metadata"]["name"]
    assert list(kubernetes.models) == ["llama-8b"]  # the managed engine's settings; qwen-7b's is the platform's
    assert kubernetes.models["llama-8b"].max_model_len == 4096 and kubernetes.gpus == 2
    assert served.config.inference.engines["llama-8b"].external is not None  # the base's engine: its Service
    role = rendered[1]
    assert role["rules"][-2:] == FULL_ENGINE_RULES == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create", "get", "list", "delete"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "list", "delete"]}]
    for document in rendered:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_without_full_fine_tunes_the_role_and_configmap_have_nothing_of_them(tmp_path):
    served, rendered = pod_served(tmp_path)
    operator = tmp_path / "operator" / "server.yaml"
    operator.write_text(operator.read_text().split("  full_fine_tunes:")[0])
    rendered = list(yaml.safe_load_all(render_k8s(load_server_config(operator))))
    assert not any(rule["resources"] in (["deployments"], ["services"]) for rule in rendered[1]["rules"])
    assert "full_fine_tunes" not in yaml.safe_load(rendered[3]["data"]["server.yaml"])["inference"]


def test_a_full_fine_tunes_engine_validates_against_the_core_schemas_and_copies_the_runs_weights(tmp_path):
    served, _ = pod_served(tmp_path)
    pool = KubernetesEngines(served.config.inference.full_fine_tunes, served.config, api=FakeKubeApi)
    engine = pool.engine(JOB_A, "llama-8b")
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tunerun-serve", "uid": "1234"}
    deployment, service = pool.manifests(JOB_A, "llama-8b", engine.settings, owner)
    for document in (deployment, service):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        assert document["metadata"]["name"] == full_engine_name(JOB_A) == f"tunerun-full-{JOB_A}"
        assert document["metadata"]["namespace"] == NAMESPACE and document["metadata"]["ownerReferences"] == [owner]
        assert document["metadata"]["labels"][JOB_LABEL] == JOB_A
        assert document["metadata"]["labels"]["app.kubernetes.io/component"] == FULL_COMPONENT
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["base-model"] and [c["name"] for c in pod["containers"]] \
        == ["vllm"]  # no adapter sidecar
    copy_weights, vllm = pod["initContainers"][0], pod["containers"][0]
    assert json.loads(copy_weights["command"][5]) == {"uri": f"s3://training/tunerun/{JOB_A}/{final_weights('model')}",
                                                      "endpoint_url": "http://minio.storage:9000"}
    args = " ".join(vllm["args"])
    assert f"--model /base/model --served-model-name {JOB_A}" in args
    assert "--enable-lora" in args  # as a full fine-tune's engine on one host
    assert "--max-model-len 4096" in args and "--gpu-memory-utilization 0.45" in args  # the full fine-tunes' share
    assert "--chat-template /base/chat-template.jinja" in args and "--tensor-parallel-size 2" in args
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    assert vllm["resources"]["limits"] == {"memory": "80Gi", "nvidia.com/gpu": "2"}  # kubernetes: {gpus, memory}
    assert pod["nodeSelector"] == {"gpu": "h100"}  # the catalog model's engine's
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert all(c["securityContext"]["capabilities"] == {"drop": ["ALL"]} for c in (copy_weights, vllm))
    assert not any("valueFrom" in e for e in vllm["env"])  # credentials only in the tunerun container
    assert {e["name"] for e in copy_weights["env"] if "valueFrom" in e} == {"AWS_ACCESS_KEY_ID",
                                                                           "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert len(deployment["metadata"]["annotations"][SPEC_ANNOTATION]) == 16


@pytest.mark.parametrize("block, message", [
    ("kubernetes: {gpu: 2}", "inference.full_fine_tunes.kubernetes.gpu.*did you mean 'gpus'"),
    ("kubernetes: {memory: lots}", "inference.full_fine_tunes.kubernetes.memory.*not a Kubernetes quantity"),
    ("kubernetes: {models: {llama-8c: {}}}",
     "inference.full_fine_tunes.kubernetes.models.llama-8c.*did you mean 'llama-8b'"),
])
def test_the_setting_is_checked_with_the_field_and_its_line_named(tmp_path, block, message):
    pod_served(tmp_path)
    operator = tmp_path / "operator" / "server.yaml"
    operator.write_text(operator.read_text().replace("kubernetes: {gpus: 2, memory: 80Gi}", block))
    with pytest.raises(SpecError, match=message) as refused:
        load_server_config(operator)
    assert "line 18 " in str(refused.value)  # the kubernetes: line


# ── the pool ────────────────────────────────────────────────────────────────────────────────────────────────

def test_the_first_request_creates_the_engine_which_serves_once_its_service_answers(pools, services):
    pool = pools()
    pool.start()
    engine, name = pool.engine(JOB_A, "llama-8b"), full_engine_name(JOB_A)
    with pytest.raises(Unavailable, match="this request started it") as started:
        engine.begin()
    assert started.value.retry_after > 0
    wait_until(lambda: pools.api.engines() == full(name))
    owner = pools.api.objects[("Deployment", NAMESPACE, name)]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == pools.api.objects[("Deployment", NAMESPACE, "tunerun-serve")]["metadata"]["uid"]
    with pytest.raises(Unavailable, match="starting") as starting:  # /health not answered yet
        engine.begin()
    assert starting.value.retry_after > 0 and not pool.ready(JOB_A)
    services.serving.add(name)
    wait_until(lambda: engine.state == "ready")
    engine.begin()
    engine.release()
    assert pool.ready(JOB_A) and engine.url.endswith(f"/{name}")
    shown = pool.health()[JOB_A]
    assert shown["state"] == "ready" and shown["deployment"] == f"{NAMESPACE}/{name}" and shown["starts"] == 1
    assert [call for call in pools.api.calls if call[0] == "create"] == [("create", "Deployment", name),
                                                                         ("create", "Service", name)]


def test_an_idle_engine_is_deleted_and_the_next_request_creates_it_again(pools, services):
    pool = pools(idle_stop_s=0.5)
    pool.start()
    engine, name = pool.engine(JOB_A, "llama-8b"), full_engine_name(JOB_A)
    services.serving.add(name)
    with pytest.raises(Unavailable):
        engine.begin()
    wait_until(lambda: engine.state == "ready")
    engine.begin()
    engine.release()
    wait_until(lambda: engine.state == "stopped")
    assert pools.api.engines() == set() and engine.idle_s() >= 0.5
    with pytest.raises(Unavailable, match="started it"):
        engine.begin()
    wait_until(lambda: engine.state == "ready")
    assert pools.api.engines() == full(name) and pool.health()[JOB_A]["starts"] == 2


def test_max_engines_bounds_them_and_the_least_recently_used_idle_one_makes_room(pools, services):
    pool = pools(max_engines=1)
    pool.start()
    first, second = pool.engine(JOB_A, "llama-8b"), pool.engine(JOB_B, "llama-8b")
    services.serving.update({first.name, second.name})
    with pytest.raises(Unavailable):
        first.begin()
    wait_until(lambda: first.state == "ready")
    first.begin()  # in flight: the one engine allowed is in use
    with pytest.raises(Unavailable, match=r"at most 1 engine\(s\).*inference.full_fine_tunes.max_engines"):
        second.begin()
    assert pools.api.engines() == full(first.name)
    first.release()
    with pytest.raises(Unavailable, match="started it"):
        second.begin()
    wait_until(lambda: second.state == "ready" and first.state == "stopped")
    assert pools.api.engines() == full(second.name)
    calls = pools.api.calls
    assert calls.index(("delete", "Deployment", first.name)) < calls.index(("create", "Deployment", second.name))


def test_an_engine_that_never_answers_is_deleted_and_an_api_refusal_is_shown(pools, services):
    pool = pools(start_timeout_s=0.5)
    pool.start()
    engine = pool.engine(JOB_A, "llama-8b")
    with pytest.raises(Unavailable):
        engine.begin()
    wait_until(lambda: engine.state == "stopped")
    assert pools.api.engines() == set() and "did not answer /health within" in pool.health()[JOB_A]["error"]
    pools.api.refuse = "create Deployment ml-jobs/x: 403 forbidden; the server's ServiceAccount lacks permission"
    with pytest.raises(Unavailable, match="started it"):
        engine.begin()
    wait_until(lambda: engine.state == "stopped" and engine.error is not None)
    assert "403 forbidden" in pool.health()[JOB_A]["error"]


def test_a_server_that_starts_again_adopts_the_engines_it_would_make_and_deletes_the_rest(pools, services):
    before = pools(max_engines=2)
    before.start()
    for job in (JOB_A, JOB_B):
        with pytest.raises(Unavailable):
            before.engine(job, "llama-8b").begin()
        wait_until(lambda job=job: ("Deployment", NAMESPACE, full_engine_name(job)) in pools.api.objects)
    before.close()  # the server stops: its engines stay
    assert pools.api.engines() == full(full_engine_name(JOB_A)) | full(full_engine_name(JOB_B))
    stale, _ = before.manifests(JOB_C, "llama-8b", before.engine(JOB_C, "llama-8b").settings, None), None
    stale[0]["metadata"]["annotations"][SPEC_ANNOTATION] = "made-by-an-older-tunerun"
    pools.api.add("Deployment", stale[0])
    pools.api.add("Service", {"metadata": {"name": "tunerun-full-gone", "namespace": NAMESPACE,
                                           "labels": {"app.kubernetes.io/component": FULL_COMPONENT}}})
    services.serving.add(full_engine_name(JOB_B))

    after = pools(max_engines=1)  # fewer engines allowed now: only the newest is kept
    assert after.adopt() == [JOB_B]
    assert pools.api.engines() == full(full_engine_name(JOB_B))  # A (one too many), C (stale), the orphan: deleted
    adopted = after.engine(JOB_B, "llama-8b")
    assert adopted.adopted and adopted.state == "starting"
    wait_until(lambda: adopted.state == "ready")
    creates = len([call for call in pools.api.calls if call[0] == "create"])
    adopted.begin()  # served without creating anything
    adopted.release()
    assert len([call for call in pools.api.calls if call[0] == "create"]) == creates


# ── through the gateway ─────────────────────────────────────────────────────────────────────────────────────

def test_a_full_fine_tune_is_served_through_the_gateway_by_the_engine_the_server_creates(
        s3_server, services, tmp_path, monkeypatch):
    bucket = s3_server.bucket(f"k8s-full-{uuid.uuid4().hex[:8]}")
    served, _ = pod_served(tmp_path, storage=f"s3://{bucket}/tunerun", endpoint=s3_server.endpoint)
    api = FakeKubeApi()
    monkeypatch.setattr(k8s_engines, "_kube_api", lambda: api)
    monkeypatch.setattr(k8s_engines, "cluster_address", services.url_of)
    run = RunFolder(served.config.storage, JOB_A)
    run.write_json(SERVICE_RECORD, {"job_id": JOB_A, "project": "acme", "model": "llama-8b",
                                    "created_at": time.time(), "request": {"training_file": "file-1"},
                                    "result_file": "file-2", "hyperparameters": {}, "seed": 0})
    run.write_json(RUN_INFO, {"run_id": JOB_A, "state": "succeeded", "target": "k8s"})
    run.write_text(f"{final_weights('model')}/config.json", "{}")
    key = KeyStore(served.config.storage).create("acme")[1]
    model = f"ft:llama-8b:acme::{JOB_A}"
    with TestClient(create_app(served)) as app:
        def complete():
            return app.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": model, "prompt": "hi", "max_tokens": 4})

        first = complete()
        assert first.status_code == 503 and int(first.headers["retry-after"]) > 0, first.text
        wait_until(lambda: api.engines() == full(full_engine_name(JOB_A)))
        services.serving.add(full_engine_name(JOB_A))
        wait_until(lambda: app.app.state.service.gateway.full.ready(JOB_A))
        answer = complete()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model and answer.json()["choices"][0]["text"] == f"from {full_engine_name(JOB_A)}"
    assert api.engines() == full(full_engine_name(JOB_A))  # the server stopped: the engine stays for the next one
