"""`tunerun serve render`: the server's own Kubernetes manifests and its vLLM engines', proven against the core
schemas; and the sbatch that runs an engine on a Slurm GPU node.

No Kubernetes API server (nor a GPU, nor vLLM's image) can run here, so every rendered object is validated (strict:
unknown fields refused) against the schemas `kubernetes-validate` ships offline, and what schemas cannot say is
asserted directly: the Role's reach, restricted pod security, credentials only by reference, GPUs as limits, and a
ConfigMap from which the pod's server loads the same configuration, its engines at their Services. What the engine
pod's init container and sidecar do is tested against an S3 server in tests/jobs/service/test_engine_files.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tunerun.cluster.slurm import TEMPLATES
from tunerun.jobs.errors import TargetError
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.deploy import render_k8s
from tunerun.jobs.service.engines import VLLM_SERVER, ExternalEngine

SPEC = """name: support
model: {path: "s3://models/llama-8b/"}
method: {kind: qlora}
resources: {gpus_per_worker: 1, workers_per_node: 4, gpu_memory_gb: 80}
"""
SERVER = """storage: {uri: s3://training/tunerun, endpoint_url: "http://minio.storage:9000"}
target: k8s
targets:
  k8s: {namespace: ml-jobs, image: registry.example.com/tunerun:0.1.0, s3_secret: s3-credentials}
models:
  llama-8b: {job: spec.yaml, description: QLoRA on 4 GPUs}
"""
ENGINES = """  Qwen_7B.v2: {job: spec.yaml}
  llama-70b: {job: spec.yaml}
inference:
  engines:
    Qwen_7B.v2:
      managed: {max_loras: 8, max_lora_rank: 64, max_model_len: 4096, gpu_memory_utilization: 0.9,
                extra_args: [--enable-prefix-caching],
                k8s: {gpus: 2, memory: 80Gi, node_selector: {gpu: h100},
                      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}}
    llama-70b: {external: {url: "http://vllm-70b:8000", adapters: /mnt/runs}}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "server.yaml").write_text(SERVER)
    return tmp_path


def documents(project) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(render_k8s(load_server_config(project / "server.yaml")))}


@pytest.fixture
def with_engines(project):
    (project / "server.yaml").write_text(SERVER + ENGINES)
    return list(yaml.safe_load_all(render_k8s(load_server_config(project / "server.yaml"))))


def engine_pod(rendered: list[dict]) -> dict:
    return rendered[6]["spec"]["template"]["spec"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def test_every_object_validates_against_the_core_schemas(project):
    found = documents(project)
    assert list(found) == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"]
    version = kubernetes_validate.latest_version()
    for document in found.values():
        kubernetes_validate.validate(document, version, strict=True)
    assert all(d["metadata"]["namespace"] == "ml-jobs" for d in found.values())


def test_the_role_reaches_only_rayjobs_and_configmaps(project):
    role = documents(project)["Role"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update", "patch", "delete"]}]
    binding = documents(project)["RoleBinding"]
    assert binding["subjects"][0]["name"] == documents(project)["Deployment"]["spec"]["template"]["spec"][
        "serviceAccountName"]


def test_a_projects_own_namespace_gets_the_same_role_and_kueue_workloads_are_readable(project):
    (project / "server.yaml").write_text(SERVER + """projects:
  acme: {kubernetes: {namespace: acme, queue: acme-queue}}
  globex: {kubernetes: {queue: globex-queue}}
  initech: {kubernetes: {namespace: ml-jobs}}
""")
    rendered = list(yaml.safe_load_all(render_k8s(load_server_config(project / "server.yaml"))))
    version = kubernetes_validate.latest_version()
    for document in rendered:
        kubernetes_validate.validate(document, version, strict=True)
    # globex's namespace defaults to its name; initech places in the server's own: nothing more for it
    extra = [(d["kind"], d["metadata"]["namespace"]) for d in rendered[6:]]
    assert extra == [("Role", "acme"), ("RoleBinding", "acme"), ("Role", "globex"), ("RoleBinding", "globex")]
    kueue = {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list"]}
    assert all(kueue in d["rules"] for d in (rendered[1], rendered[6], rendered[8]))  # a queue is set
    assert rendered[6]["rules"] == rendered[1]["rules"]
    assert rendered[7]["subjects"] == [{"kind": "ServiceAccount", "name": rendered[0]["metadata"]["name"],
                                        "namespace": "ml-jobs"}]


def test_the_pod_is_restricted_and_gets_credentials_only_by_reference(project):
    pod = documents(project)["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == \
        "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"AWS_ACCESS_KEY_ID": "s3-credentials", "AWS_SECRET_ACCESS_KEY": "s3-credentials",
                       "AWS_SESSION_TOKEN": "s3-credentials"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["command"] == ["tunerun", "serve", "--config", "/etc/tunerun/server.yaml"]


def test_the_pods_server_loads_the_same_configuration_from_the_configmap(project, tmp_path_factory, monkeypatch):
    """Write the ConfigMap's keys where the pod mounts them (a temporary stand-in for /etc/tunerun) and load."""
    data = documents(project)["ConfigMap"]["data"]
    mounted = tmp_path_factory.mktemp("etc-tunerun")
    for key, text in data.items():
        (mounted / key).write_text(text.replace("/etc/tunerun", str(mounted)))
    monkeypatch.chdir(mounted)
    served = load_server_config(mounted / "server.yaml")
    assert served.config.host == "0.0.0.0" and served.config.port == 8000 and served.config.target == "k8s"
    assert served.templates["llama-8b"].model.path == "s3://models/llama-8b/"
    assert served.config.models["llama-8b"].description == "QLoRA on 4 GPUs"


def test_a_server_that_pods_could_not_run_is_refused_with_every_reason(project):
    (project / "spec.yaml").write_text(SPEC.replace('"s3://models/llama-8b/"', "./models/llama"))
    (project / "server.yaml").write_text("storage: {uri: ./runs}\nmodels:\n  llama-8b: {job: spec.yaml}\n"
                                         "inference: {engines: {llama-8b: {managed: {}}}}\n")
    with pytest.raises(TargetError) as refused:
        render_k8s(load_server_config(project / "server.yaml"))
    message = str(refused.value)
    assert "target is 'local'" in message and "storage.uri" in message and "model.path" in message


def test_the_cli_prints_them_for_kubectl(project):
    result = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "serve", "render", "--config", "server.yaml"],
                            cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)][-1] == "Service"


# ── the engines ─────────────────────────────────────────────────────────────────────────────────────────────

def test_each_managed_engine_is_a_deployment_and_service_that_validate_against_the_core_schemas(with_engines):
    kinds = [(d["kind"], d["metadata"]["name"]) for d in with_engines]
    assert kinds[6:] == [("Deployment", "tunerun-vllm-qwen-7b-v2"), ("Service", "tunerun-vllm-qwen-7b-v2")]
    assert [kind for kind, _ in kinds[:6]] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
                                                "Service"]  # the external engine is the platform's: nothing for it
    version = kubernetes_validate.latest_version()
    for document in with_engines:
        kubernetes_validate.validate(document, version, strict=True)
    deployment, service = with_engines[6:]
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "ml-jobs"
    assert deployment["metadata"]["annotations"]["tunerun/model"] == "Qwen_7B.v2"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert service["spec"]["selector"] != with_engines[5]["spec"]["selector"]  # not the server's pods


def test_the_pods_server_reaches_the_engine_at_its_service_and_reads_adapters_where_the_sidecar_puts_them(
        with_engines, project, tmp_path_factory, monkeypatch):
    data = with_engines[3]["data"]
    mounted = tmp_path_factory.mktemp("etc-tunerun")
    for key, text in data.items():
        (mounted / key).write_text(text.replace("/etc/tunerun", str(mounted)))
    monkeypatch.chdir(mounted)
    engines = load_server_config(mounted / "server.yaml").config.inference.engines
    service, pod = with_engines[7], engine_pod(with_engines)
    external = engines["Qwen_7B.v2"].external
    assert engines["Qwen_7B.v2"].managed is None
    assert external.url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert (external.max_loras, external.max_model_len) == (8, 4096)
    assert engines["llama-70b"].external.url == "http://vllm-70b:8000"  # left as the platform runs it
    mirror, vllm = container(pod, "adapter-mirror"), container(pod, "vllm")
    into = mirror["command"][mirror["command"].index("--into") + 1]
    assert external.adapters == into
    assert {"name": "adapters", "mountPath": into, "readOnly": True} in vllm["volumeMounts"]
    assert ExternalEngine("Qwen_7B.v2", external).adapter_path(None, "ftjob-1/final/adapter") == \
        f"{into}/ftjob-1/final/adapter"  # the sidecar's layout: tests/jobs/service/test_engine_files.py
    assert mirror["command"][:5] == ["python", "-m", "tunerun.jobs.service.engine_files", "adapters", "--storage"]
    assert json.loads(mirror["command"][5]) == {"uri": "s3://training/tunerun",
                                                "endpoint_url": "http://minio.storage:9000"}
    assert mirror["command"][mirror["command"].index("--model") + 1] == "Qwen_7B.v2"


def test_the_engine_runs_vllm_with_runtime_lora_on_its_gpus_from_the_copied_base(with_engines):
    pod = engine_pod(with_engines)
    vllm, base = container(pod, "vllm"), container(pod, "base-model")
    assert vllm["image"].startswith("vllm/vllm-openai:v") and vllm["command"] == ["python3", "-m", VLLM_SERVER]
    args = " ".join(vllm["args"])
    assert "--model /base/model --served-model-name Qwen_7B.v2 --host 0.0.0.0 --port 8000" in args
    assert "--enable-lora --max-loras 8 --max-lora-rank 64 --dtype bfloat16 --max-model-len 4096" in args
    assert "--gpu-memory-utilization 0.9" in args and "--chat-template /base/chat-template.jinja" in args
    assert "--tensor-parallel-size 2" in args and vllm["args"][-1] == "--enable-prefix-caching"
    env = {e["name"]: e["value"] for e in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert vllm["resources"]["limits"] == {"memory": "80Gi", "nvidia.com/gpu": "2"}
    assert vllm["resources"]["requests"] == {"cpu": "4", "memory": "80Gi"}
    assert {"name": "base", "mountPath": "/base", "readOnly": True} in vllm["volumeMounts"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The base model is copied from the catalog spec's model.path, with the storage settings its jobs train with.
    assert base["command"][3] == "base" and base["command"][-2:] == ["--into", "/base"]
    assert json.loads(base["command"][5]) == {"uri": "s3://models/llama-8b/",
                                              "endpoint_url": "http://minio.storage:9000"}
    assert {"name": "base", "mountPath": "/base"} in base["volumeMounts"]
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
    assert vllm["startupProbe"]["periodSeconds"] * vllm["startupProbe"]["failureThreshold"] >= 900


def test_the_engine_pod_is_restricted_and_only_the_tunerun_containers_get_credentials(with_engines, monkeypatch):
    pod = engine_pod(with_engines)
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    for name in ("base-model", "vllm", "adapter-mirror"):
        assert container(pod, name)["securityContext"] == {"allowPrivilegeEscalation": False,
                                                           "readOnlyRootFilesystem": True,
                                                           "capabilities": {"drop": ["ALL"]}}
    writable = {m["mountPath"] for m in container(pod, "vllm")["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/dev/shm"}
    assert {e["name"]: e["value"] for e in container(pod, "vllm")["env"]}["HOME"] == "/tmp"
    assert all(set(volume) == {"name", "emptyDir"} for volume in pod["volumes"])
    for name in ("base-model", "adapter-mirror"):
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container(pod, name)["env"]
                   if "valueFrom" in e}
        assert secrets == {"AWS_ACCESS_KEY_ID": "s3-credentials", "AWS_SECRET_ACCESS_KEY": "s3-credentials",
                           "AWS_SESSION_TOKEN": "s3-credentials"}
    assert not any("valueFrom" in e for e in container(pod, "vllm")["env"])


def test_webhook_secrets_reach_the_server_from_a_secret_by_reference(project, monkeypatch):
    monkeypatch.setenv("ACME_HOOK", "whsec_" + "A" * 32)
    (project / "server.yaml").write_text(SERVER + """webhooks:
  allow: [https://hooks.example.com]
  endpoints:
    acme: [{url: https://hooks.example.com/acme, secret_env: ACME_HOOK}]
""")
    text = render_k8s(load_server_config(project / "server.yaml"))
    server = next(d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment")
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ACME_HOOK"]["valueFrom"] == {"secretKeyRef": {"name": "tunerun-serve-webhooks", "key": "ACME_HOOK"}}
    assert "whsec_" not in text


def test_no_credential_value_reaches_the_manifests(project, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NEVER-IN-A-MANIFEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-in-a-manifest")
    (project / "server.yaml").write_text(SERVER + ENGINES)
    text = render_k8s(load_server_config(project / "server.yaml"))
    assert "NEVER-IN-A-MANIFEST" not in text and "never-in-a-manifest" not in text


@pytest.mark.parametrize("models, refused", [
    ("  " + "m" * 51 + ": {job: spec.yaml}\n", "at most 50 characters"),
    ("  llama.8b: {job: spec.yaml}\n  llama_8b: {job: spec.yaml}\n", "would both run as tunerun-vllm-llama-8b"),
    ("  llama-8b-: {job: spec.yaml}\n", "not a DNS-1035 label"),
])
def test_a_model_whose_engine_cannot_be_named_for_kubernetes_is_refused(project, models, refused):
    names = [line.split(":")[0].strip() for line in models.splitlines()]
    engines = "".join(f"    {name}: {{managed: {{}}}}\n" for name in names)
    (project / "server.yaml").write_text(SERVER + models + "inference:\n  engines:\n" + engines)
    with pytest.raises(TargetError, match=refused):
        render_k8s(load_server_config(project / "server.yaml"))


# ── Slurm ───────────────────────────────────────────────────────────────────────────────────────────────────

def test_the_slurm_engine_script_parses_and_starts_vllm_as_the_gateway_needs_it():
    """The template a user adapts (no GPU node here: bash reads it, and it names what the gateway relies on)."""
    script = TEMPLATES / "vllm-engine.sbatch"  # slurm/, installed as tunerun.slurm
    text = script.read_text(encoding="utf-8")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --gres=gpu:1" in text
    assert f"-m {VLLM_SERVER}" in text and '"$VLLM_PYTHON"' in text
    for flag in ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-model-len", "--served-model-name",
                 "--chat-template", "--port", "--host 0.0.0.0"):
        assert flag in text, flag
    assert "export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in text
    assert "-m tunerun.jobs.service.engine_files chat-template" in text
    assert "external: {url: http://" in text and "adapters:" in text
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
