"""The `k8s` target: a KubeRay ``RayJob`` per run, rendered from the templates in k8s/ and created through the
`kubernetes` Python client (the current kubeconfig, or the in-cluster service account).

``render(job)`` is pure: a resolved job in, two YAML documents out (the ConfigMap holding the resolved job and the
RayJob), parsed back and checked before anyone sees them, so ``tunerun render job.yaml --target k8s |
kubectl apply -f -`` and ``tunerun submit --target k8s`` create the same objects. Credentials are only ever
referenced (a Secret via ``secretKeyRef``); the run folder must live on S3 because the pods cannot see the
submitting machine's disk.

Inside the head pod the entrypoint is ``python -m tunerun.cluster.k8s adopt <job file> && exec python -m
tunerun.trainer <run-uri>``: ``adopt`` writes the job into the run folder unless it is already there (a manifest
applied with kubectl), then the same trainer entrypoint as every target runs. A RayJob retry (``backoffLimit``)
starts a new Ray cluster on the same run id, and the trainer resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator

from tunerun.cluster.run_folder import JOB, RUN_INFO, RunFolder
from tunerun.cluster.runs import Handle, RunInfo, create_run, read_info, record_refused, update_info
from tunerun.cluster.targets import Observation, Target, trainer_shell_command
from tunerun.jobs.errors import TargetError, TunerunError
from tunerun.jobs.plan import ResolvedJob
from tunerun.jobs.spec import Strict, suggest_name

# KubeRay refuses longer RayJob names (it derives the RayCluster, its services and the submitter Job from it
# within the 63-character label limit); the CRD schema does not check this, the operator does at reconcile time.
MAX_RAYJOB_NAME = 47
RAY_GROUP, RAY_VERSION, RAYJOBS = "ray.io", "v1", "rayjobs"
# Kueue: the label that puts a job in a LocalQueue, and the Workload it then makes for the job (named from the
# RayJob, labelled with the RayJob's uid: `kueue.x-k8s.io/job-uid`, which is how `observe` finds it).
KUEUE_QUEUE_LABEL, KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/job-uid"
KUEUE_GROUP, KUEUE_VERSION, WORKLOADS = "kueue.x-k8s.io", "v1beta1", "workloads"
JOB_DIR = "/etc/tunerun"  # where the head pod mounts the ConfigMap
SCRATCH = "/scratch"
TEMPLATES = ("configmap.yaml.j2", "rayjob.yaml.j2")
REQUEST_TIMEOUT = (5, 30)  # (connect, read) seconds for each API call
SERVED_KINDS = ("Deployment", "Service")  # what `tunerun serve` creates for a full fine-tune's engine


# ── names ───────────────────────────────────────────────────────────────────────────────────────────────────

class KubeRaySettings(Strict):
    """KubeRay `RayJob` settings for `tunerun render/submit --target k8s` (templates in k8s/).

    Names and label values are checked here against Kubernetes' own rules, so a typo fails `tunerun validate`
    instead of an API call; what a pod may contain (affinity terms) is checked by the API server.
    """

    namespace: str = "default"
    # Kueue LocalQueue in the namespace: the RayJob is created suspended with the queue label, and Kueue starts
    # it once the queue's ClusterQueue has quota for it (`tunerun serve`: a project's `kubernetes.queue`).
    queue: str | None = None
    image: str = "tunerun:latest"  # built from k8s/Dockerfile
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    s3_secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN optional)
    # Secret with MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD (each optional)
    mlflow_secret: str | None = None
    service_account: str | None = None
    priority_class: str | None = None
    labels: dict[str, str] = {}  # on the RayJob, the ConfigMap and every pod
    node_selector: dict[str, str] = {}  # every Ray pod (head and workers)
    tolerations: list[dict[str, str | int]] = []  # e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    affinity: dict[str, dict] = {}  # nodeAffinity / podAffinity / podAntiAffinity, as in a pod spec
    head_cpus: int = Field(2, ge=1)  # the head runs the driver (data preparation), no training worker
    head_memory: str = "8Gi"
    worker_memory: str | None = None  # per node (one worker pod per node); None = 4Gi per CPU of the pod
    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's resource name
    shm_size: str = "8Gi"  # /dev/shm (memory-backed) for NCCL and Ray's object store
    scratch_size: str = "100Gi"  # model and data cache (TUNERUN_CACHE)
    scratch_storage_class: str | None = None  # None = emptyDir on the node's disk; else a generic ephemeral volume
    backoff_limit: int = Field(2, ge=0)  # RayJob retries; each starts a new Ray cluster that resumes the run
    active_deadline_seconds: int | None = Field(None, ge=1)
    ttl_seconds_after_finished: int = Field(3600, ge=0)  # the finished Ray cluster is deleted after this
    termination_grace_period_seconds: int = Field(300, ge=0)  # time for the checkpoint written on SIGTERM
    pod_security: Literal["restricted", "baseline"] = "restricted"  # Pod Security Standard the pods meet
    run_as_user: int = Field(1000, ge=1)  # the image's non-root uid (k8s/Dockerfile: 1000)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return cls.dns_label(v)

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        return None if v is None else cls.queue_name(v)

    @field_validator("s3_secret", "mlflow_secret", "service_account", "priority_class", "scratch_storage_class")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        return None if v is None else cls.dns_subdomain(v)

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        return [cls.dns_subdomain(name) for name in v]

    @field_validator("image", "gpu_resource")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        if not v or re.search(r"[\s\"'`$\\]", v):
            raise ValueError(f"{v!r}: expected a single word without spaces, quotes or '$'")
        return v

    @field_validator("head_memory", "worker_memory", "shm_size", "scratch_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", str(v)):
            raise ValueError(f"{v!r} is not a Kubernetes quantity; write e.g. 512Mi, 16Gi or 1Ti")
        return v

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            cls.label_key(key)
            if len(value) > 63 or not re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value):
                raise ValueError(f"{key}: {value!r} is not a valid label value (at most 63 letters, digits, '-', "
                                 "'_' or '.', starting and ending with a letter or digit)")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict]) -> list[dict]:
        allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for toleration in v:
            unknown = set(toleration) - allowed
            if unknown:
                raise ValueError(f"unknown toleration field {sorted(unknown)[0]!r}; allowed: "
                                 f"{', '.join(sorted(allowed))}")
            if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"toleration operator must be Equal or Exists (got {toleration['operator']!r})")
            if toleration.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError("toleration effect must be NoSchedule, PreferNoSchedule or NoExecute "
                                 f"(got {toleration['effect']!r})")
            if "key" in toleration:
                cls.label_key(str(toleration["key"]))
        return v

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, v: dict[str, dict]) -> dict[str, dict]:
        unknown = set(v) - {"nodeAffinity", "podAffinity", "podAntiAffinity"}
        if unknown:
            raise ValueError(f"unknown affinity kind {sorted(unknown)[0]!r}; expected nodeAffinity, podAffinity or "
                             "podAntiAffinity")
        return v

    @staticmethod
    def dns_label(v: str) -> str:
        """RFC 1123 label: what Kubernetes requires of a namespace name."""
        if len(v) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", v):
            raise ValueError(f"{v!r} is not a valid name: at most 63 lowercase letters, digits or '-', starting "
                             f"and ending with a letter or digit — try '{suggest_name(v)}'")
        return v

    @classmethod
    def queue_name(cls, v: str) -> str:
        """A Kueue LocalQueue: an object name that is also the value of the queue label (at most 63 characters)."""
        if len(v) > 63:
            raise ValueError(f"{v[:70]!r} is too long for a LocalQueue name: a label value holds at most 63 characters")
        return cls.dns_subdomain(v)

    @staticmethod
    def dns_subdomain(v: str) -> str:
        """RFC 1123 subdomain: what Kubernetes requires of Secret, ServiceAccount and PriorityClass names."""
        part = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
        if len(v) > 253 or not re.fullmatch(rf"{part}(\.{part})*", v):
            raise ValueError(f"{v!r} is not a valid object name: lowercase letters, digits, '-' and '.', starting "
                             f"and ending with a letter or digit — try '{suggest_name(v)}'")
        return v

    @classmethod
    def label_key(cls, key: str) -> str:
        prefix, _, name = key.rpartition("/")
        if prefix:
            cls.dns_subdomain(prefix)
        if len(name) > 63 or not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", name):
            raise ValueError(f"{key!r} is not a valid label key: an optional DNS prefix and '/', then at most 63 "
                             "letters, digits, '-', '_' or '.'")
        return key


def rayjob_name(run_id: str) -> str:
    """A DNS-1035 label of at most 47 characters derived from the run id.

    A run id that already is one is used as it is; any other (uppercase, spaces, too long) is cleaned and cut,
    and gets 8 hex digits of the sha256 of the original run id, so two run ids never share a RayJob by accident.
    """
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", run_id.lower())).strip("-")
    if not slug[:1].isalpha():
        slug = f"run-{slug}".rstrip("-")  # DNS-1035: the first character is a letter
    if slug == run_id and len(slug) <= MAX_RAYJOB_NAME:
        return slug
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    return f"{slug[:MAX_RAYJOB_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def _check_run_id(run_id: str) -> None:
    if not run_id or "/" in run_id or any(ord(c) < 32 or ord(c) == 127 for c in run_id):
        raise TargetError(f"run id {run_id!r} cannot name a run folder: use letters, digits, '-', '_' or '.' "
                          "(no '/', no control characters)")


# ── render ──────────────────────────────────────────────────────────────────────────────────────────────────

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job in the ConfigMap) as literal blocks; PyYAML falls back to quotes if unsafe."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def _yaml(value, indent: int) -> str:
    text = yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10**6).rstrip("\n")
    return text.replace("\n", "\n" + " " * indent)


@functools.lru_cache(maxsize=1)
def template_environment():
    """The Jinja environment of the templates in k8s/ (the RayJob's, and `tunerun serve`'s own manifests)."""
    import jinja2

    folder = resources.files("tunerun.k8s")
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: folder.joinpath(name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["q"] = json.dumps  # a JSON string is a valid YAML scalar, whatever it contains
    env.filters["yaml"] = _yaml
    return env


def render_manifests(job: ResolvedJob) -> str:
    """The ConfigMap and the RayJob of ``job`` as one multi-document YAML text, checked after parsing back."""
    context = _context(job)
    documents = []
    for template in TEMPLATES:
        text = template_environment().get_template(template).render(**context)
        # Optional blocks leave whitespace-only lines behind; YAML never needs them.
        documents.append("\n".join(line for line in text.splitlines() if line.strip()) + "\n")
    text = "---\n".join(documents)
    _check(list(yaml.safe_load_all(text)), job)
    return text


def manifests(job: ResolvedJob) -> list[dict]:
    """``render_manifests(job)`` parsed: [ConfigMap, RayJob]."""
    return list(yaml.safe_load_all(render_manifests(job)))


def _local_paths(job: ResolvedJob) -> list[str]:
    spec = job.spec
    fields = {"storage.uri": spec.storage.uri, "model.path": spec.model.path, "data.train": spec.data.train,
              "data.eval": spec.data.eval, "storage.ca_bundle": spec.storage.ca_bundle,
              "eval.general": None if spec.eval.general == "default" else spec.eval.general}
    return [f"{field} ({value})" for field, value in fields.items() if value and "://" not in value]


def _context(job: ResolvedJob) -> dict:
    _check_run_id(job.run_id)
    local = _local_paths(job)
    if local:
        raise TargetError(f"the Kubernetes pods cannot read this machine's files: {', '.join(local)}; put them on "
                          "S3-compatible storage (e.g. --set storage.uri=s3://bucket/runs, model.path: "
                          "s3://bucket/models/name/)")
    spec, k8s, res = job.spec, KubeRayTarget.settings(job.spec), job.spec.resources
    name = rayjob_name(job.run_id)
    labels = {**k8s.labels, "app.kubernetes.io/name": "tunerun", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": "tunerun"}
    cpus = res.workers_per_node * res.cpus_per_worker
    gpus = res.workers_per_node * res.gpus_per_worker
    worker = {"cpu": str(cpus), "memory": k8s.worker_memory or f"{4 * cpus}Gi"}
    start_params = {"num-cpus": str(cpus)}
    if gpus:
        worker[k8s.gpu_resource] = str(gpus)
        start_params["num-gpus"] = str(gpus)  # KubeRay only infers it from nvidia.com/gpu
    env = {"TUNERUN_CACHE": f"{SCRATCH}/tunerun", "HF_HOME": f"{SCRATCH}/huggingface"}
    if spec.storage.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = spec.storage.endpoint_url
    if spec.storage.region:
        env["AWS_DEFAULT_REGION"] = spec.storage.region
    return {
        **k8s.model_dump(), "name": name, "configmap": f"{name}-job", "labels": labels,
        # Only the RayJob is queued: Kueue reads the label there (on a pod it would queue the pod on its own).
        "rayjob_labels": {**labels, KUEUE_QUEUE_LABEL: k8s.queue} if k8s.queue else labels,
        "pod_labels": {role: {**labels, "app.kubernetes.io/component": role}
                       for role in ("head", "worker", "submitter")},
        "annotations": {"tunerun/run-id": job.run_id, "tunerun/run-uri": job.run_uri},
        "image_pull_secrets": [{"name": secret} for secret in k8s.image_pull_secrets],
        "restricted": k8s.pod_security == "restricted", "entrypoint": _entrypoint(job), "nodes": res.nodes,
        "head_resources": {"cpu": str(k8s.head_cpus), "memory": k8s.head_memory}, "worker_resources": worker,
        "worker_start_params": start_params, "env": env, "scratch_path": SCRATCH, "job_dir": JOB_DIR,
        "job_yaml": yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False),
    }


def _entrypoint(job: ResolvedJob) -> str:
    adopt = ["python", "-m", "tunerun.cluster.k8s", "adopt", f"{JOB_DIR}/{JOB}"]
    return f"{shlex.join(adopt)} && exec {trainer_shell_command(job)}"


def _check(documents: list[dict], job: ResolvedJob) -> None:
    """What the schemas cannot say: the name limit, and that the job survives the trip through YAML."""
    kinds = [(d.get("apiVersion"), d.get("kind")) for d in documents]
    if kinds != [("v1", "ConfigMap"), ("ray.io/v1", "RayJob")]:
        raise TargetError(f"the k8s templates rendered {kinds}, expected a ConfigMap and a RayJob")
    configmap, rayjob = documents
    name = rayjob["metadata"]["name"]
    if len(name) > MAX_RAYJOB_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise TargetError(f"RayJob name {name!r} is not a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    if ResolvedJob.model_validate(yaml.safe_load(configmap["data"][JOB])) != job:
        raise TargetError("the resolved job does not read back from the rendered ConfigMap unchanged")
    if rayjob["spec"]["entrypoint"] != _entrypoint(job):
        raise TargetError("the RayJob entrypoint did not survive rendering unchanged")
    queue = KubeRayTarget.settings(job.spec).queue
    if queue and (rayjob["metadata"]["labels"].get(KUEUE_QUEUE_LABEL) != queue or rayjob["spec"].get("suspend")
                  is not True):
        raise TargetError(f"the RayJob for LocalQueue {queue!r} must carry {KUEUE_QUEUE_LABEL} and be suspended")


# ── the Kubernetes API ──────────────────────────────────────────────────────────────────────────────────────

class KubeApi:
    """The few calls this target makes, each turning API failures into one actionable `TargetError`."""

    def __init__(self):
        from kubernetes import client, config

        configuration = client.Configuration()
        self.context = None
        # Read KUBECONFIG now: the client's default is the value it had when `kubernetes` was first imported.
        kubeconfig = os.environ.get("KUBECONFIG", "~/.kube/config")
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            self.context = config.list_kube_config_contexts(kubeconfig)[1].get("name")
        except (config.ConfigException, FileNotFoundError, TypeError) as kube_error:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                raise TargetError(f"no Kubernetes configuration: {kube_error}; set KUBECONFIG or run `kubectl "
                                  "config use-context …` (or run inside a pod with a service account)") from None
        configuration.retries = 1  # an unreachable API server fails in seconds, with the message below
        self.host = configuration.host
        api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)  # `tunerun serve`'s full fine-tune engines (jobs/service/k8s_engines)
        self.custom = client.CustomObjectsApi(api_client)

    def call(self, what: str, method, *args, missing_ok: bool = False, exists_ok: bool = False, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            if (exc.status == 404 and missing_ok) or (exc.status == 409 and exists_ok):
                return None
            raise self._explain(exc, what) from None
        except HTTPError as exc:
            raise TargetError(f"{what}: cannot reach the Kubernetes API server at {self.host} "
                              f"({type(exc).__name__}); check the kubeconfig context and the network") from None

    def _explain(self, exc, what: str) -> TargetError:
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (TypeError, ValueError):
            message = exc.reason
        hints = {
            401: "the API server did not accept the kubeconfig's credentials; log in again",
            403: "your account lacks permission (RBAC): it needs create/get/delete on rayjobs.ray.io and "
                 "configmaps in this namespace",
            409: "it already exists: cancel the run first (`tunerun cancel RUN`) or choose another --run-id",
        }
        hint = hints.get(exc.status, "")
        if exc.status == 403 and any(f" {kind} " in f" {what} " for kind in SERVED_KINDS):
            hint = ("the server's ServiceAccount lacks permission (RBAC): render its Role again with `tunerun serve "
                    "render` (inference.full_fine_tunes set) and apply it")
        if exc.status == 404 and "rayjob" in what.lower() and "create" in what.lower():
            hint = "the cluster has no RayJob resource (ray.io/v1): install the KubeRay operator"
        return TargetError(f"{what}: {exc.status} {message}" + (f"; {hint}" if hint else ""))

    def create(self, document: dict, exists_ok: bool = False) -> dict | None:
        """The created object; None if it existed already and ``exists_ok``."""
        namespace, name = document["metadata"]["namespace"], document["metadata"]["name"]
        if document["kind"] == "ConfigMap":
            created = self.call(f"create ConfigMap {namespace}/{name}", self.core.create_namespaced_config_map,
                                namespace, document, exists_ok=exists_ok)
            return created and created.to_dict()
        return self.call(f"create RayJob {namespace}/{name}", self.custom.create_namespaced_custom_object,
                         RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, document)

    # ── Deployments and Services (`tunerun serve`'s engines for full fine-tunes) ──

    def create_served(self, document: dict) -> dict | None:
        """Create a Deployment or a Service; None if one of that name exists already."""
        kind, namespace, name = document["kind"], document["metadata"]["namespace"], document["metadata"]["name"]
        method = self.apps.create_namespaced_deployment if kind == "Deployment" else self.core.create_namespaced_service
        created = self.call(f"create {kind} {namespace}/{name}", method, namespace, document, exists_ok=True)
        return created and self._plain(created)

    def list_served(self, kind: str, namespace: str, selector: str) -> list[dict]:
        """The Deployments or Services of ``namespace`` that carry the labels of ``selector`` (``key=value,…``)."""
        method = self.apps.list_namespaced_deployment if kind == "Deployment" else self.core.list_namespaced_service
        found = self.call(f"list {kind} in {namespace}", method, namespace, label_selector=selector)
        return [self._plain(item) for item in found.items]

    def get_served(self, kind: str, namespace: str, name: str) -> dict | None:
        method = self.apps.read_namespaced_deployment if kind == "Deployment" else self.core.read_namespaced_service
        found = self.call(f"read {kind} {namespace}/{name}", method, name, namespace, missing_ok=True)
        return found and self._plain(found)

    def delete_served(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a Deployment (its pods with it) or a Service; False if it was not there."""
        from kubernetes import client

        method = self.apps.delete_namespaced_deployment if kind == "Deployment" else self.core.delete_namespaced_service
        deleted = self.call(f"delete {kind} {namespace}/{name}", method, name, namespace, missing_ok=True,
                            body=client.V1DeleteOptions(propagation_policy="Background"))
        return deleted is not None

    def _plain(self, found) -> dict:
        """A typed answer as the API server wrote it (camelCase keys), like the custom objects' answers."""
        return self.core.api_client.sanitize_for_serialization(found)

    def replace_configmap(self, document: dict) -> None:
        namespace, name = document["metadata"]["namespace"], document["metadata"]["name"]
        self.call(f"replace ConfigMap {namespace}/{name}", self.core.replace_namespaced_config_map, name,
                  namespace, document)

    def own(self, namespace: str, configmap: str, rayjob: dict) -> None:
        """Make the RayJob own the ConfigMap: deleting the RayJob (TTL or cancel) deletes the ConfigMap too."""
        owner = {"apiVersion": f"{RAY_GROUP}/{RAY_VERSION}", "kind": "RayJob", "name": rayjob["metadata"]["name"],
                 "uid": rayjob["metadata"]["uid"]}
        self.call(f"set the owner of ConfigMap {namespace}/{configmap}", self.core.patch_namespaced_config_map,
                  configmap, namespace, {"metadata": {"ownerReferences": [owner]}})

    def get_rayjob(self, namespace: str, name: str) -> dict | None:
        return self.call(f"read RayJob {namespace}/{name}", self.custom.get_namespaced_custom_object, RAY_GROUP,
                         RAY_VERSION, namespace, RAYJOBS, name, missing_ok=True)

    def workload_of(self, namespace: str, job_uid: str) -> dict | None:
        """Kueue's Workload for the job with uid ``job_uid`` (None when there is none yet); `TargetError` when the
        cluster has no Kueue."""
        found = self.call(f"list Kueue Workloads in {namespace}", self.custom.list_namespaced_custom_object,
                          KUEUE_GROUP, KUEUE_VERSION, namespace, WORKLOADS,
                          label_selector=f"{KUEUE_JOB_UID_LABEL}={job_uid}", missing_ok=True)
        if found is None:
            raise TargetError(f"the cluster has no Kueue Workload resource ({KUEUE_GROUP}/{KUEUE_VERSION}): install "
                              "Kueue, or remove the queue from targets.k8s")
        items = found.get("items") or []
        return max(items, key=lambda w: w["metadata"].get("creationTimestamp") or "") if items else None

    def delete(self, namespace: str, rayjob: str, configmap: str) -> bool:
        """Delete the RayJob (KubeRay then deletes its Ray cluster) and the ConfigMap; False if neither existed."""
        from kubernetes import client

        body = client.V1DeleteOptions(propagation_policy="Background")
        deleted = self.call(f"delete RayJob {namespace}/{rayjob}", self.custom.delete_namespaced_custom_object,
                            RAY_GROUP, RAY_VERSION, namespace, RAYJOBS, rayjob, body=body, missing_ok=True)
        self.call(f"delete ConfigMap {namespace}/{configmap}", self.core.delete_namespaced_config_map, configmap,
                  namespace, missing_ok=True)
        return deleted is not None

    def submitter_log(self, namespace: str, rayjob: str, follow: bool):
        """The submitter pod's output (`ray job submit` tails the driver's log), or None when there is none."""
        pods = self.call(f"list pods of RayJob {namespace}/{rayjob}", self.core.list_namespaced_pod, namespace,
                         label_selector=f"job-name={rayjob}").items
        if not pods:
            return None
        newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp or 0)
        stream = self.call(f"read the log of pod {newest.metadata.name}", self.core.read_namespaced_pod_log,
                           newest.metadata.name, namespace, follow=follow, _preload_content=False)
        return stream.stream(4096) if follow else [stream.data]


# ── the target surface ──────────────────────────────────────────────────────────────────────────────────────

class RayJobHandle(Handle):
    """A KubeRay ``RayJob`` and the ConfigMap holding the resolved job."""

    namespace: str | None = None
    rayjob: str | None = None
    configmap: str | None = None
    uid: str | None = None
    context: str | None = None  # the kubeconfig context and API server it was created through
    api_server: str | None = None
    job_status: str | None = None  # observed by `status` from the RayJob's .status
    deployment_status: str | None = None
    reason: str | None = None
    message: str | None = None
    failed: int | None = None
    error: str | None = None
    queue: str | None = None  # the Kueue LocalQueue it waits in
    waiting: str | None = None  # observed: why Kueue has not admitted it yet (its Workload's words)


def kueue_waiting(queue: str, namespace: str, workload: dict | None) -> str | None:
    """Why Kueue has not admitted a job, from its Workload as Kueue writes it (`status.conditions`); None once it
    is admitted (the RayJob is unsuspended a moment later)."""
    if workload is None:
        return (f"waiting for Kueue to queue it in LocalQueue {namespace}/{queue} (no Workload yet: check that Kueue "
                "manages RayJobs and that the LocalQueue exists)")
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    if conditions.get("Admitted", {}).get("status") == "True":
        return None
    # QuotaReserved=False says why (no quota in the ClusterQueue, waiting for the cohort, an inadmissible queue);
    # Evicted=True says why an admitted job was sent back (preempted by a higher priority, the cohort reclaimed).
    for kind, status in (("Evicted", "True"), ("QuotaReserved", "False"), ("QuotaReserved", "True")):
        condition = conditions.get(kind)
        if condition and condition.get("status") == status and condition.get("message"):
            return f"waiting in Kueue LocalQueue {queue}: {condition['message']}"
    return f"waiting in Kueue LocalQueue {queue} for admission"


class KubeRayTarget(Target):
    name = "k8s"
    Handle = RayJobHandle
    Settings = KubeRaySettings

    def render(self, job: ResolvedJob) -> str:
        return render_manifests(job)

    def submit(self, job: ResolvedJob, resume: bool = False) -> RunFolder:
        """Create the run folder, then the ConfigMap and the RayJob; the RayJob then owns the ConfigMap."""
        configmap, rayjob = manifests(job)  # rendered and checked before anything is created
        api = KubeApi()
        run = create_run(job, self.name, resume)
        namespace = rayjob["metadata"]["namespace"]
        record = {"namespace": namespace, "rayjob": rayjob["metadata"]["name"],
                  "configmap": configmap["metadata"]["name"], "context": api.context, "api_server": api.host,
                  "queue": rayjob["metadata"]["labels"].get(KUEUE_QUEUE_LABEL)}
        try:
            if api.create(configmap, exists_ok=resume) is None:
                api.replace_configmap(configmap)  # a resumed run's earlier ConfigMap may still be there
            created = api.create(rayjob)
            api.own(namespace, record["configmap"], created)
        except TargetError as exc:
            record_refused(run, str(exc), **{self.name: record})
            raise
        update_info(run, **{self.name: {**record, "uid": created["metadata"].get("uid")}})
        run.event("k8s_submitted", rayjob=record["rayjob"], namespace=namespace)
        run.flush()
        return run

    def observe(self, info: RunInfo) -> Observation | None:
        """The RayJob's own view (jobStatus, jobDeploymentStatus) when the API server answers."""
        handle = self.handle(info)
        if not handle.rayjob:
            return None
        try:
            api = KubeApi()
            rayjob = api.get_rayjob(handle.namespace, handle.rayjob)
            waiting = self._waiting(api, rayjob) if rayjob else None
        except TargetError as exc:
            return Observation(handle.model_copy(update={"error": str(exc)}))
        if rayjob is None:  # TTL after the end, or cancelled
            return Observation(handle.model_copy(update={"deployment_status": "deleted"}))
        found = rayjob.get("status") or {}
        view = {"job_status": found.get("jobStatus"), "deployment_status": found.get("jobDeploymentStatus"),
                "reason": found.get("reason"), "message": found.get("message"), "failed": found.get("failed"),
                "waiting": waiting}
        ended = view["deployment_status"] in ("Complete", "Failed")
        error = (f"RayJob {handle.rayjob} ended ({view['deployment_status']}"
                 f"{', ' + view['reason'] if view['reason'] else ''}) without the driver recording an outcome"
                 f"{': ' + view['message'] if view['message'] else ''}")
        seen = {k: v for k, v in view.items() if v is not None}
        return Observation(handle.model_copy(update={**seen, "waiting": waiting}), ended=ended, error=error,
                           waiting=waiting)

    @staticmethod
    def _waiting(api: KubeApi, rayjob: dict) -> str | None:
        """Kueue's reason a queued RayJob has not started: read from its Workload while the RayJob is suspended
        (Kueue unsuspends it on admission, so a running one costs no second call)."""
        queue = (rayjob["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if not queue or not (rayjob.get("spec") or {}).get("suspend"):
            return None
        namespace = rayjob["metadata"]["namespace"]
        return kueue_waiting(queue, namespace, api.workload_of(namespace, rayjob["metadata"]["uid"]))

    def stop(self, info: RunInfo) -> bool:
        """Delete the RayJob (its pods get SIGTERM and terminationGracePeriodSeconds to checkpoint) and the
        ConfigMap. True if the RayJob was there."""
        handle = self.handle(info)
        if not handle.rayjob:
            return False
        return KubeApi().delete(handle.namespace, handle.rayjob, handle.configmap or f"{handle.rayjob}-job")

    def describe(self, info: RunInfo) -> str:
        handle = self.handle(info)
        return f"RayJob {handle.namespace}/{handle.rayjob}"

    def view(self, info: RunInfo) -> str | None:
        k8s = self.handle(info)
        if k8s is None or not k8s.rayjob:
            return None
        if k8s.error:
            return f"RayJob {k8s.namespace}/{k8s.rayjob}: not readable ({k8s.error})"
        parts = [f"{key} {value}" for key in ("deployment_status", "job_status", "reason", "message", "waiting")
                 if (value := getattr(k8s, key))]
        return f"RayJob {k8s.namespace}/{k8s.rayjob}" + (f": {', '.join(parts)}" if parts else "")

    def logs(self, run: RunFolder, write, follow: bool = False) -> None:
        """The driver's output from the submitter pod while it exists, else the copy in the run folder."""
        handle = self.handle(read_info(run))
        chunks = KubeApi().submitter_log(handle.namespace, handle.rayjob, follow) if handle and handle.rayjob \
            else None
        if chunks is None:
            super().logs(run, write, follow)
            return
        for chunk in chunks:
            write(chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk)


# ── inside the head pod ─────────────────────────────────────────────────────────────────────────────────────

def adopt(job_file: str | Path) -> RunFolder:
    """Put the job from the ConfigMap into the run folder unless it is there already.

    ``tunerun submit`` wrote it before creating the RayJob; a manifest applied with kubectl has only the
    ConfigMap, so the run starts here. A later launch on the same run (a RayJob retry) only leaves an event.
    """
    job = ResolvedJob.model_validate(yaml.safe_load(Path(job_file).read_text(encoding="utf-8")))
    run = RunFolder(job.spec.storage, job.run_id)
    record = {"namespace": os.environ.get("TUNERUN_K8S_NAMESPACE"), "rayjob": os.environ.get("TUNERUN_K8S_RAYJOB")}
    if not run.exists(RUN_INFO):
        run = create_run(job, KubeRayTarget.name)
        update_info(run, **{KubeRayTarget.name: {**record, "configmap": f"{record['rayjob']}-job"}})
    elif read_info(run).started_at:
        run.event("run_relaunched", target=KubeRayTarget.name, rayjob=record["rayjob"])
    run.flush()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunerun.cluster.k8s")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("adopt", help="write the job into its run folder unless it is there").add_argument("job_file")
    args = parser.parse_args(argv)
    try:
        run = adopt(args.job_file)
    except TunerunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {run.run_id} · {run.uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
