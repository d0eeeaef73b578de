"""`tunerun serve` on Kubernetes: the manifests that run the server itself (``k8s/serve.yaml.j2``) and the vLLM
engines of its catalog models (``k8s/serve-engine.yaml.j2``).

ServiceAccount, a Role that may only create, read and delete RayJobs and ConfigMaps in its namespace (what the
k8s target does for each job), its RoleBinding, a ConfigMap with server.yaml and every model's job spec, the
Deployment (the same image as the training pods, restricted pod security, a read-only root filesystem) and a
ClusterIP Service. Then, for each managed engine of server.yaml, a Deployment of vLLM's image on GPUs and its
Service: an init container copies the base model from S3 and writes the chat template its weights carry, a sidecar
keeps the model's succeeded adapters copied from the storage (`tunerun.jobs.service.engine_files`), and the
ConfigMap's server.yaml names that engine as external at the Service's address. Last, for each namespace a project
places its jobs in (``projects.<name>.kubernetes.namespace``) other than the server's, the same Role and a
RoleBinding to the server's ServiceAccount (``k8s/serve-namespace.yaml.j2``); where a Kueue queue is set, the Role
also reads Workloads, which say why a job waits. Rendered text is parsed back and
checked before anyone sees it; the tests validate it against the core Kubernetes schemas, as the RayJob's
manifests are.

Where server.yaml serves full fine-tunes (``inference.full_fine_tunes``), the ConfigMap's server.yaml also gets
``full_fine_tunes.kubernetes``: the namespace, the server's Deployment (the owner of what it creates) and each
catalog model's managed engine settings, from which the server in its pod renders a full fine-tune's own engine
(``k8s/serve-full-engine.yaml.j2``, `full_engine_manifests`) when the fine-tune is first called
(`tunerun.jobs.service.k8s_engines`); its Role then also creates, lists and deletes Deployments and Services, and
reads its own Deployment. Both engine templates share the pod's parts (``k8s/serve-vllm-parts.j2``).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import TYPE_CHECKING

import yaml

from tunerun.cluster.k8s import rayjob_name
from tunerun.jobs.errors import TargetError
from tunerun.jobs.service.engine_files import BASE_MODEL, BASE_TEMPLATE
from tunerun.jobs.service.engines import VLLM_SERVER, ManagedEngineSettings, vllm_arguments, vllm_environment
from tunerun.jobs.service.k8s_engines import BASE_ANNOTATION, FULL_COMPONENT, JOB_LABEL, SPEC_ANNOTATION

if TYPE_CHECKING:  # config.py imports the full fine-tunes' settings (k8s_engines), which render with this module
    from tunerun.jobs.service.config import Served, ServerConfig

NAME = "tunerun-serve"
CONFIG_DIR = "/etc/tunerun"
PORT = 8000
KINDS = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"]
ENGINE_KINDS = ["Deployment", "Service"]  # per managed engine, after the server's own
NAMESPACE_KINDS = ["Role", "RoleBinding"]  # per project namespace other than the server's, after the engines
# What the server does in a namespace it places jobs in: the k8s target's RayJob and ConfigMap of each job, and,
# where a project's jobs wait in a Kueue LocalQueue, reading the Workload that says why (`KUEUE_RULE`).
JOB_RULES = [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "delete"]},
             {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update", "patch", "delete"]}]
KUEUE_RULE = {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list"]}
# Full fine-tunes' own engines (k8s_engines): created on a first request, found again by label after a restart
# (list), deleted when idle; the server reads its own Deployment to make it their owner.
FULL_ENGINE_RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create", "get", "list", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "list", "delete"]}]
WEBHOOK_SECRET = f"{NAME}-webhooks"  # the Secret holding one key per webhooks.endpoints.*.secret_env
ENGINE_PREFIX = "tunerun-vllm-"
FULL_ENGINE_PREFIX = "tunerun-full-"  # + the job's id: a full fine-tune's own engine
ENGINE_PORT = 8000
# The engine pod's emptyDirs: the base model and its chat template (init container), the adapters (sidecar).
BASE_DIR, ADAPTERS_DIR = "/base", "/adapters"
ENGINE_FILES = ["python", "-m", "tunerun.jobs.service.engine_files"]
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # what a Service's name must be


def render_k8s(served: Served) -> str:
    from tunerun.cluster.k8s import template_environment

    context = _context(served)
    environment = template_environment()
    texts = [environment.get_template("serve.yaml.j2").render(**context),
             *(environment.get_template("serve-engine.yaml.j2").render(**engine) for engine in context["engines"]),
             *(environment.get_template("serve-namespace.yaml.j2").render(**context, project_namespace=namespace)
               for namespace in context["project_namespaces"])]
    text = "---\n".join(_without_blank_lines(part) for part in texts)
    documents = list(yaml.safe_load_all(text))
    expected = (KINDS + ENGINE_KINDS * len(context["engines"])
                + NAMESPACE_KINDS * len(context["project_namespaces"]))
    if [d["kind"] for d in documents] != expected:
        raise TargetError(f"k8s/serve*.yaml.j2 rendered {[d['kind'] for d in documents]}, expected {expected}")
    if yaml.safe_load(documents[3]["data"]["server.yaml"]) != context["server_yaml"]:
        raise TargetError("server.yaml does not read back from the rendered ConfigMap unchanged")
    engines = documents[len(KINDS):len(KINDS) + len(ENGINE_KINDS) * len(context["engines"])]
    for engine, (deployment, service) in zip(context["engines"], zip(engines[::2], engines[1::2])):
        if deployment["metadata"]["name"] != engine["name"] or service["metadata"]["name"] != engine["name"]:
            raise TargetError(f"k8s/serve-engine.yaml.j2 did not name {engine['model']}'s engine {engine['name']}")
    return text


def _without_blank_lines(text: str) -> str:
    """Optional blocks leave whitespace-only lines behind; YAML never needs them."""
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


def engine_name(model: str) -> str:
    """The Deployment and Service of ``model``'s engine: ``tunerun-vllm-<model>``, lowercased, '_' and '.' as '-'.
    Its Service's name is the engine's host name in the namespace, so it must be a DNS-1035 label."""
    name = ENGINE_PREFIX + model.lower().replace("_", "-").replace(".", "-")
    if len(name) > 63 or not DNS_1035.fullmatch(name):
        raise TargetError(f"inference.engines.{model}: its engine's Service would be named {name!r}, which is not a "
                          f"DNS-1035 label (at most 63 lowercase letters, digits or '-', ending with a letter or "
                          f"digit); give the catalog model a name of at most {63 - len(ENGINE_PREFIX)} characters "
                          "that ends with a letter or digit")
    return name


def full_engine_name(job_id: str) -> str:
    """The Deployment and Service of a full fine-tune's own engine: ``tunerun-full-<job id>`` (a service job's id
    is already a DNS label; any other is cleaned, cut and given a digest, as a RayJob's name is)."""
    return FULL_ENGINE_PREFIX + rayjob_name(job_id)


def _context(served: Served) -> dict:
    config = served.config
    _check_reachable_from_pods(served)
    # In the pod, server.yaml names each model's spec where the ConfigMap mounts it.
    server = config.model_dump(mode="json", exclude_defaults=True)
    server["models"] = {name: {**entry.model_dump(mode="json", exclude_none=True),
                               "job": f"{CONFIG_DIR}/model-{name}.yaml"} for name, entry in config.models.items()}
    server.update(host="0.0.0.0", port=PORT)
    engines = [_engine_context(served, model, entry.managed)
               for model, entry in config.inference.engines.items() if entry.managed]
    _check_distinct(engines)
    for engine in engines:  # in the pod, the server reaches each engine at its Service
        server["inference"]["engines"][engine["model"]] = {"external": engine["external"]}
    if config.inference.full_fine_tunes is not None:
        server["inference"].setdefault("full_fine_tunes", {})["kubernetes"] = _full_fine_tunes_on_kubernetes(config)
    files = {"server.yaml": yaml.safe_dump(server, sort_keys=False),
             **{f"model-{name}.yaml": text for name, text in served.texts.items()}}
    env = {"TUNERUN_CACHE": "/tmp/tunerun", "HOME": "/tmp"}
    if config.storage.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = config.storage.endpoint_url
    if config.storage.region:
        env["AWS_DEFAULT_REGION"] = config.storage.region
    return {
        **_pods(config), "name": NAME, "configmap": f"{NAME}-config", "labels": _labels(config, "serve"),
        "selector": {"app.kubernetes.io/name": "tunerun", "app.kubernetes.io/component": "serve"},
        "command": ["tunerun", "serve", "--config", f"{CONFIG_DIR}/server.yaml"], "port": PORT, "env": env,
        "config_dir": CONFIG_DIR, "tmp_size": "20Gi", "files": files, "server_yaml": server, "engines": engines,
        "config_digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        **_reach(config), "webhook_secret": WEBHOOK_SECRET,
        "webhook_secrets": sorted({endpoint.secret_env for endpoints in config.webhooks.endpoints.values()
                                   for endpoint in endpoints}),
    }


def _labels(config: ServerConfig, component: str) -> dict[str, str]:
    return {**config.targets.k8s.labels, "app.kubernetes.io/name": "tunerun", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "tunerun"}


def _full_fine_tunes_on_kubernetes(config: ServerConfig) -> dict:
    """``inference.full_fine_tunes.kubernetes`` for the server in its pod: its namespace, its Deployment (the owner
    of the engines it creates), and the managed settings of each catalog model's engine, which its full
    fine-tunes' engines share; what the admin wrote there (pod settings, models of their own engines) is kept."""
    written = config.inference.full_fine_tunes.kubernetes
    kept = written.model_dump(mode="json", exclude_none=True, exclude_defaults=True) if written else {}
    namespace = config.targets.k8s.namespace
    if kept.get("namespace", namespace) != namespace:
        raise TargetError(f"inference.full_fine_tunes.kubernetes.namespace is {kept['namespace']!r}: full "
                          f"fine-tunes' engines run in the server's namespace (targets.k8s.namespace, {namespace!r}), "
                          "where its Role reaches; leave it unset")
    managed = {model: entry.managed.model_dump(mode="json", exclude_defaults=True)
               for model, entry in config.inference.engines.items() if entry.managed}
    return {**kept, "namespace": namespace, "owner": NAME, "models": {**kept.get("models", {}), **managed}}


def _reach(config: ServerConfig) -> dict:
    """The server's Role rules in its own namespace and in the namespaces beyond it that projects place jobs in
    (each gets a Role bound to the server's ServiceAccount): full fine-tunes' engines run in its own only."""
    placements = [config.targets_for(project)["k8s"] for project in config.projects]
    queued = config.targets.k8s.queue or any(k8s.get("queue") for k8s in placements)
    own = config.targets.k8s.namespace
    job_rules = JOB_RULES + ([KUEUE_RULE] if queued else [])
    full = FULL_ENGINE_RULES if config.inference.full_fine_tunes is not None else []
    return {"rules": job_rules + full, "project_rules": job_rules,
            "project_namespaces": sorted({k8s["namespace"] for k8s in placements} - {own})}


def _pods(config: ServerConfig) -> dict:
    """What every pod of the server's takes from targets.k8s: the namespace, the tunerun image, pod security and
    the S3 credentials' Secret."""
    k8s = config.targets.k8s
    return {"namespace": k8s.namespace, "image": k8s.image, "image_pull_policy": k8s.image_pull_policy,
            "image_pull_secrets": [{"name": secret} for secret in k8s.image_pull_secrets],
            "restricted": k8s.pod_security == "restricted", "run_as_user": k8s.run_as_user,
            "s3_secret": k8s.s3_secret}


def _engine_context(served: Served, model: str, settings: ManagedEngineSettings) -> dict:
    """One managed engine as a Deployment: vLLM's image on ``settings.k8s.gpus`` GPUs, the base model and the
    adapters in emptyDirs the tunerun image fills (`tunerun.jobs.service.engine_files`)."""
    config, name = served.config, engine_name(model)
    storage = config.storage.model_dump(mode="json", exclude_defaults=True)
    pod = engine_pod(config, name, "vllm", model, served.templates[model].model.path, settings)
    return {
        **pod, "model": model, "annotations": {"tunerun/model": model}, "owner": None,
        "mirror_command": [*ENGINE_FILES, "adapters", "--storage", json.dumps(storage), "--model", model,
                           "--into", ADAPTERS_DIR, "--every", str(settings.k8s.mirror_every_s)],
        "adapters_dir": ADAPTERS_DIR,
        "external": {"url": f"http://{name}:{ENGINE_PORT}", "adapters": ADAPTERS_DIR, "max_loras": settings.max_loras,
                     "max_model_len": settings.max_model_len},
    }


def engine_pod(config: ServerConfig, name: str, component: str, served_name: str, weights_uri: str,
               settings: ManagedEngineSettings) -> dict:
    """What both engine templates render (k8s/serve-vllm-parts.j2): vLLM's image on ``settings.k8s.gpus`` GPUs
    serving ``served_name`` from the weights at ``weights_uri`` with LoRA at run time (a full fine-tune's engine
    too, as on one host), the weights copied into an emptyDir by an init container of the tunerun image with the
    chat template they carry."""
    pod = settings.k8s
    selector = {"app.kubernetes.io/name": "tunerun", "app.kubernetes.io/component": component,
                "app.kubernetes.io/instance": name}
    storage = config.storage.model_dump(mode="json", exclude_defaults=True)
    # A job of the service trains with the server's storage settings (endpoint, region) and reads its model with
    # them: so does the pod.
    weights = storage | {"uri": weights_uri}
    more = ["--chat-template", f"{BASE_DIR}/{BASE_TEMPLATE}"]
    if pod.gpus > 1:
        more += ["--tensor-parallel-size", str(pod.gpus)]
    vllm_env = {**vllm_environment(settings), "HF_HUB_OFFLINE": "1",  # the model is a folder: never ask a hub
                # a read-only root filesystem: vLLM, Triton and torch.compile keep their caches under HOME; a uid
                # without a passwd entry gets its user name from USER
                "HOME": "/tmp", "USER": "vllm"}
    return {
        **_pods(config), "name": name, "selector": selector, "labels": {**_labels(config, component), **selector},
        "vllm_image": pod.image, "port": ENGINE_PORT, "vllm_command": ["python3", "-m", VLLM_SERVER],
        "vllm_args": vllm_arguments(settings, served_name, f"{BASE_DIR}/{BASE_MODEL}", "0.0.0.0", ENGINE_PORT, more),
        "vllm_env": vllm_env, "requests": {"cpu": pod.cpu, "memory": pod.memory},
        "limits": {"memory": pod.memory, **({config.targets.k8s.gpu_resource: str(pod.gpus)} if pod.gpus else {})},
        # The first start copies the model and loads it onto the GPUs: as long as a managed engine may take.
        "startup_failures": math.ceil(settings.start_timeout_s / 10),
        "base_command": [*ENGINE_FILES, "base", "--storage", json.dumps(weights), "--into", BASE_DIR],
        "tunerun_env": {"HOME": "/tmp", "TUNERUN_CACHE": "/tmp/tunerun"},
        "base_dir": BASE_DIR, "adapters_dir": None, "read_only_root": pod.read_only_root_filesystem,
        "node_selector": pod.node_selector, "tolerations": pod.tolerations, "shm_size": pod.shm_size,
        "base_size": pod.base_size, "adapters_size": pod.adapters_size, "cache_size": pod.cache_size,
    }


def full_engine_manifests(config: ServerConfig, job_id: str, base: str, settings: ManagedEngineSettings,
                          weights_uri: str, owner: dict | None) -> list[dict]:
    """A full fine-tune's own engine, [Deployment, Service] (``k8s/serve-full-engine.yaml.j2``): ``settings`` are its
    catalog model's managed engine settings (with the full fine-tunes' own pod and memory settings), ``owner`` the
    server's Deployment as an owner reference. The Deployment carries a digest of what was rendered, so a server
    whose settings changed since tells an engine it made before from one it would make now."""
    from tunerun.cluster.k8s import template_environment

    name = full_engine_name(job_id)
    context = engine_pod(config, name, FULL_COMPONENT, job_id, weights_uri, settings)
    context["labels"][JOB_LABEL] = job_id  # a service job's id is a label value; the server finds its own by it
    context.update(annotations={"tunerun/model": job_id, BASE_ANNOTATION: base},
                   owner=[owner] if owner else None)
    text = _without_blank_lines(template_environment().get_template("serve-full-engine.yaml.j2").render(**context))
    documents = list(yaml.safe_load_all(text))
    if [(d["kind"], d["metadata"]["name"]) for d in documents] != [(kind, name) for kind in ENGINE_KINDS]:
        raise TargetError(f"k8s/serve-full-engine.yaml.j2 rendered {[d['kind'] for d in documents]}, expected "
                          f"{ENGINE_KINDS} named {name}")
    documents[0]["metadata"]["annotations"][SPEC_ANNOTATION] = spec_digest(documents)
    return documents


def spec_digest(documents: list[dict]) -> str:
    """What an engine's objects ask for, less who owns them and the digest itself."""
    def plain(document: dict) -> dict:
        metadata = {k: v for k, v in document["metadata"].items() if k not in ("ownerReferences", "annotations")}
        return {**document, "metadata": metadata}

    return hashlib.sha256(json.dumps([plain(d) for d in documents], sort_keys=True).encode()).hexdigest()[:16]


def _check_distinct(engines: list[dict]) -> None:
    seen: dict[str, str] = {}
    for engine in engines:
        other = seen.setdefault(engine["name"], engine["model"])
        if other != engine["model"]:
            raise TargetError(f"inference.engines.{other} and inference.engines.{engine['model']} would both run as "
                              f"{engine['name']}: rename one of the catalog models")


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
    if problems:
        raise TargetError("cannot run this server on Kubernetes: " + "; ".join(problems))
