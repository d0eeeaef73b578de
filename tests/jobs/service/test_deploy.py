"""`tunerun serve render`: the server's own Kubernetes manifests, proven against the core schemas.

No Kubernetes API server can run here, so every rendered object is validated (strict: unknown fields refused)
against the schemas `kubernetes-validate` ships offline, and what schemas cannot say is asserted directly: the
Role's reach, restricted pod security, credentials only by reference, and a ConfigMap from which the pod's
server loads the same configuration.
"""
from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tunerun.jobs.errors import TargetError
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.deploy import render_k8s

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


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "server.yaml").write_text(SERVER)
    return tmp_path


def documents(project) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(render_k8s(load_server_config(project / "server.yaml")))}


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
    assert "inference.engines.llama-8b is managed" in message


def test_the_cli_prints_them_for_kubectl(project):
    result = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "serve", "render", "--config", "server.yaml"],
                            cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)][-1] == "Service"
