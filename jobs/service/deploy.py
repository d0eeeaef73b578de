"""`tunerun serve` on Kubernetes: the manifests that run the server itself (``k8s/serve.yaml.j2``).

ServiceAccount, a Role that may only create, read and delete RayJobs and ConfigMaps in its namespace (what the
k8s target does for each job), its RoleBinding, a ConfigMap with server.yaml and every model's job spec, the
Deployment (the same image as the training pods, restricted pod security, a read-only root filesystem) and a
ClusterIP Service. Rendered text is parsed back and checked before anyone sees it; the tests validate it against
the core Kubernetes schemas, as the RayJob's manifests are.
"""
from __future__ import annotations

import hashlib
import json

import yaml

from tunerun.jobs.errors import TargetError
from tunerun.jobs.service.config import Served

NAME = "tunerun-serve"
CONFIG_DIR = "/etc/tunerun"
PORT = 8000
KINDS = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"]


def render_k8s(served: Served) -> str:
    from tunerun.cluster.k8s import template_environment

    context = _context(served)
    text = template_environment().get_template("serve.yaml.j2").render(**context)
    text = "\n".join(line for line in text.splitlines() if line.strip()) + "\n"
    documents = list(yaml.safe_load_all(text))
    if [d["kind"] for d in documents] != KINDS:
        raise TargetError(f"k8s/serve.yaml.j2 rendered {[d['kind'] for d in documents]}, expected {KINDS}")
    if yaml.safe_load(documents[3]["data"]["server.yaml"]) != context["server_yaml"]:
        raise TargetError("server.yaml does not read back from the rendered ConfigMap unchanged")
    return text


def _context(served: Served) -> dict:
    config = served.config
    _check_reachable_from_pods(served)
    k8s = config.targets.k8s
    # In the pod, server.yaml names each model's spec where the ConfigMap mounts it.
    server = config.model_dump(mode="json", exclude_defaults=True)
    server["models"] = {name: {**entry.model_dump(mode="json", exclude_none=True),
                               "job": f"{CONFIG_DIR}/model-{name}.yaml"} for name, entry in config.models.items()}
    server.update(host="0.0.0.0", port=PORT)
    files = {"server.yaml": yaml.safe_dump(server, sort_keys=False),
             **{f"model-{name}.yaml": text for name, text in served.texts.items()}}
    labels = {**k8s.labels, "app.kubernetes.io/name": "tunerun", "app.kubernetes.io/component": "serve",
              "app.kubernetes.io/managed-by": "tunerun"}
    env = {"TUNERUN_CACHE": "/tmp/tunerun", "HOME": "/tmp"}
    if config.storage.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = config.storage.endpoint_url
    if config.storage.region:
        env["AWS_DEFAULT_REGION"] = config.storage.region
    return {
        "name": NAME, "configmap": f"{NAME}-config", "namespace": k8s.namespace, "labels": labels,
        "selector": {"app.kubernetes.io/name": "tunerun", "app.kubernetes.io/component": "serve"},
        "image": k8s.image, "image_pull_policy": k8s.image_pull_policy,
        "image_pull_secrets": [{"name": secret} for secret in k8s.image_pull_secrets],
        "restricted": k8s.pod_security == "restricted", "run_as_user": k8s.run_as_user, "s3_secret": k8s.s3_secret,
        "command": ["tunerun", "serve", "--config", f"{CONFIG_DIR}/server.yaml"], "port": PORT, "env": env,
        "config_dir": CONFIG_DIR, "tmp_size": "20Gi", "files": files, "server_yaml": server,
        "config_digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
    }


def _check_reachable_from_pods(served: Served) -> None:
    config = served.config
    problems = []
    if config.target != "k8s":
        problems.append(f"target is {config.target!r}: on Kubernetes the service starts its jobs as RayJobs "
                        "(target: k8s)")
    if not config.storage.is_s3:
        problems.append(f"storage.uri {config.storage.uri} is a local folder the pods cannot share; use s3://…")
    for name, spec in served.templates.items():
        if "://" not in spec.model.path:
            problems.append(f"models.{name}: model.path {spec.model.path} is on this machine; put it on S3")
    for name, engine in config.inference.engines.items():
        if engine.managed:
            problems.append(f"inference.engines.{name} is managed: the server's pod has no vLLM; run the engine as "
                            "its own Deployment and name it here as external: {url, adapters}")
    if problems:
        raise TargetError("cannot run this server on Kubernetes: " + "; ".join(problems))
