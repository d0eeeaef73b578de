"""The k8s target's manifests, proven against the real schemas (no Kubernetes API server can run here).

Every rendered RayJob validates against the openAPIV3Schema of KubeRay's CRD (shared/schemas/kuberay, v1.7.0),
tightened to refuse unknown fields as `kubectl apply --validate=strict` does; its pod templates and the
ConfigMap validate against the core Kubernetes schemas that `kubernetes-validate` ships (offline). What the
schemas cannot say (name limits, no credentials anywhere, Pod Security "restricted") is asserted directly.

The rendered manifests of the shipped examples are kept in tests/cluster/expected/k8s/; after a deliberate
change to the templates or the spec (the ConfigMap carries the whole resolved job), regenerate them with

    TUNERUN_REGENERATE=1 python -m pytest tests/cluster/test_k8s_render.py

and review the diff.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tunerun.cluster import k8s
from tunerun.cluster.targets import job_model
from tunerun.jobs.errors import SpecError, TargetError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import resolve

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared"
CRD = SHARED / "schemas" / "kuberay" / "ray.io_rayjobs.yaml"
EXPECTED = Path(__file__).resolve().parent / "expected" / "k8s"
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.yaml"))
SECRET_VALUE = "do-not-leak-7f3a9c"  # the submitting shell's secret key: must appear in no manifest
RUN_ID = "run-20261123-101500"


def example_sets(name: str) -> list[str]:
    """The examples name local folders; on Kubernetes model, data and run folders live on S3."""
    return ["storage.uri=s3://tunerun-runs/team", f"model.path=s3://tunerun-models/{name}/",
            f"data.train=s3://tunerun-data/{name}/train.jsonl", "storage.endpoint_url=http://minio.storage:9000",
            "targets.k8s.s3_secret=s3-credentials"]


def render_example(path: Path) -> str:
    job = resolve(load_job(str(path), example_sets(path.stem), model=job_model()), run_id=f"{path.stem}-20261123-101500")
    return k8s.render_manifests(job)


@pytest.fixture(autouse=True)
def submitting_shell_credentials(monkeypatch):
    """resolve() wants S3 credentials in the environment; their values must never reach a manifest."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-submitter")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)


def job_for(*sets: str, example: str = "quickstart", run_id: str = RUN_ID):
    spec = load_job(str(REPO / "jobs" / "examples" / f"{example}.yaml"), [*example_sets(example), *sets],
                    model=job_model())
    return resolve(spec, run_id=run_id)


# ── schemas ─────────────────────────────────────────────────────────────────────────────────────────────────

def _strict(schema):
    """Refuse unknown fields wherever the CRD lists the known ones (the API server's strict field validation)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.lru_cache(maxsize=1)
def rayjob_validator():
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    v1 = next(version for version in crd["spec"]["versions"] if version["name"] == "v1")
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def pods_of(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"], "submitter": rayjob["spec"]["submitterPodTemplate"]}
    for group in cluster["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return {role: {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role}", **t["metadata"]},
                   "spec": t["spec"]} for role, t in templates.items()}


def assert_valid(documents: list[dict]) -> None:
    import kubernetes_validate

    configmap, rayjob = documents
    errors = sorted(rayjob_validator().iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
    version = kubernetes_validate.latest_version()
    for resource in [configmap, *pods_of(rayjob).values()]:
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_strict_crd_schema_catches_what_the_operator_would_reject():
    """The validator itself works: a misspelt field and a wrong type are refused."""
    good = k8s.manifests(job_for())[1]
    typo = copy.deepcopy(good)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert not list(rayjob_validator().iter_errors(good))
    assert list(rayjob_validator().iter_errors(typo)) and list(rayjob_validator().iter_errors(wrong_type))


def test_kubernetes_validate_works_offline_and_refuses_a_bad_pod():
    import kubernetes_validate

    pod = pods_of(k8s.manifests(job_for())[1])["head"]
    pod["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


SPECS = {
    "cpu-1-node": [],
    "gpu-2-nodes-x8": ["resources.nodes=2", "resources.workers_per_node=8", "resources.gpus_per_worker=1",
                       "resources.cpus_per_worker=8", "training.global_batch_size=64",
                       "training.micro_batch_size=4", "method={kind: lora}"],
    "qlora": ["example=qlora-8b"],
    "zero3-offload": ["example=zero3-70b", "method.zero={stage: 3, offload_optimizer: true, offload_params: true}",
                      "targets.k8s.worker_memory=1500Gi", "targets.k8s.shm_size=64Gi"],
    "placement": ["resources.gpus_per_worker=1",
                  "targets.k8s.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}, "
                  "{key: dedicated, operator: Equal, value: ml-team, effect: NoExecute, tolerationSeconds: 600}]",
                  "targets.k8s.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, pool: training}",
                  "targets.k8s.affinity={nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
                  "{nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, "
                  "values: [zone-a]}]}]}}}",
                  "targets.k8s.priority_class=training-high", "targets.k8s.service_account=tunerun-runner",
                  "targets.k8s.labels={team: nlp, cost-center: cc-42}", "targets.k8s.namespace=ml-jobs",
                  "targets.k8s.image_pull_secrets=[registry-cred]", "targets.k8s.scratch_storage_class=fast-ssd",
                  "targets.k8s.active_deadline_seconds=86400", "targets.k8s.gpu_resource=amd.com/gpu"],
    "baseline-security": ["targets.k8s.pod_security=baseline", "targets.k8s.s3_secret=null"],
}


def _spec_job(name: str):
    sets = SPECS[name]
    example = next((s.split("=", 1)[1] for s in sets if s.startswith("example=")), "quickstart")
    return job_for(*[s for s in sets if not s.startswith("example=")], example=example)


@pytest.mark.parametrize("name", SPECS)
def test_rendered_manifests_validate_against_kuberay_and_core_schemas(name):
    job = _spec_job(name)
    text = k8s.render_manifests(job)
    documents = list(yaml.safe_load_all(text))
    assert_valid(documents)
    configmap, rayjob = documents
    res, target = job.spec.resources, k8s.KubeRayTarget.settings(job.spec)

    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == res.nodes
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == str(res.workers_per_node * res.cpus_per_worker)
    gpus = res.workers_per_node * res.gpus_per_worker
    assert limits.get(target.gpu_resource) == (str(gpus) if gpus else None)
    assert workers["rayStartParams"].get("num-gpus") == (str(gpus) if gpus else None)
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == target.ttl_seconds_after_finished
    assert spec["backoffLimit"] == target.backoff_limit
    assert spec.get("activeDeadlineSeconds") == target.active_deadline_seconds
    assert "runtimeEnvYAML" not in spec
    command = shlex.split(spec["entrypoint"].split(" && exec ", 1)[1])
    assert command[:4] == ["python", "-m", "tunerun.trainer", job.run_uri]
    assert command[4:] == ["--endpoint-url", "http://minio.storage:9000"]
    assert configmap["data"]["job.yaml"] == yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)

    assert SECRET_VALUE not in text and "AKIA-submitter" not in text
    for role, pod in pods_of(rayjob).items():
        _assert_pod(role, pod["spec"], job)


def _assert_pod(role: str, pod: dict, job) -> None:
    target = k8s.KubeRayTarget.settings(job.spec)
    restricted = target.pod_security == "restricted"
    assert pod.get("serviceAccountName") == target.service_account
    assert pod.get("nodeSelector", {}) == target.node_selector
    assert pod.get("tolerations", []) == target.tolerations
    assert pod.get("priorityClassName") == target.priority_class
    for container in pod["containers"]:
        context = container.get("securityContext", {})
        assert not context.get("privileged")
        if restricted:
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault"
        for variable in container.get("env", []):  # credentials only by reference
            if variable["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                assert "value" not in variable and variable["valueFrom"]["secretKeyRef"]["name"] == target.s3_secret
    if restricted:
        assert pod["securityContext"]["runAsNonRoot"] is True
    else:
        assert "securityContext" not in pod
    if role == "submitter":
        assert pod["restartPolicy"] == "Never"
        return
    assert pod["terminationGracePeriodSeconds"] == target.termination_grace_period_seconds
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": target.shm_size}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    env = {v["name"]: v.get("value") for v in pod["containers"][0]["env"]}
    assert env["TUNERUN_CACHE"].startswith(mounts["scratch"])
    assert ("AWS_SECRET_ACCESS_KEY" in env) == bool(target.s3_secret)
    if role == "head":
        assert volumes["job"]["configMap"]["name"] == f"{k8s.rayjob_name(job.run_id)}-job"


# ── hostile names ───────────────────────────────────────────────────────────────────────────────────────────

HOSTILE_RUN_IDS = ["My Run 2026", "A" * 70, "x: y # z'\"{}[]&*!|>%@`", "123-starts-with-digit", "---", "Ümlaut-run",
                   "quickstart-20261123-101500-" + "a" * 30]


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS)
def test_hostile_run_ids_become_valid_stable_rayjob_names(run_id):
    name = k8s.rayjob_name(run_id)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    assert k8s.rayjob_name(run_id) == name
    documents = k8s.manifests(job_for(run_id=run_id))
    assert_valid(documents)
    configmap, rayjob = documents
    assert rayjob["metadata"]["name"] == name and rayjob["metadata"]["annotations"]["tunerun/run-id"] == run_id
    assert shlex.split(rayjob["spec"]["entrypoint"].split(" && exec ", 1)[1])[3] == f"s3://tunerun-runs/team/{run_id}"


def test_run_ids_that_differ_only_in_case_or_punctuation_get_different_names():
    names = {k8s.rayjob_name(r) for r in ["Run-A", "run-a", "run a", "run_a", "RUN-A"]}
    assert len(names) == 5
    assert k8s.rayjob_name("quickstart-20261123-101500") == "quickstart-20261123-101500"  # valid ids stay as they are


@pytest.mark.parametrize("run_id", ["a/b", "tab\there", ""])
def test_run_ids_that_cannot_name_a_run_folder_are_refused(run_id):
    with pytest.raises(TargetError, match="cannot name a run folder"):
        k8s.render_manifests(job_for(run_id=run_id or "x").model_copy(update={"run_id": run_id}))


@pytest.mark.parametrize("setting, field, says", [
    ("targets.k8s.namespace=Team NS", "targets.k8s.namespace", "try 'team-ns'"),
    ("targets.k8s.labels={team: 'a: b'}", "targets.k8s.labels", "not a valid label value"),
    ("targets.k8s.labels={'bad key!': x}", "targets.k8s.labels", "not a valid label key"),
    ("targets.k8s.image=tunerun:latest; rm -rf /", "targets.k8s.image", "without spaces"),
    ("targets.k8s.s3_secret=S3_Credentials", "targets.k8s.s3_secret", "try 's3-credentials'"),
    ("targets.k8s.shm_size=8 GB", "targets.k8s.shm_size", "not a Kubernetes quantity"),
    ("targets.k8s.tolerations=[{key: gpu, operator: Has}]", "targets.k8s.tolerations", "Equal or Exists"),
    ("targets.k8s.affinity={nodeAfinity: {}}", "targets.k8s.affinity", "unknown affinity kind"),
    ("targets.k8s.queue='q; kubectl delete ns x'", "targets.k8s.queue", "not a valid object name"),
    ("targets.k8s.queue='q\\n  suspend: false'", "targets.k8s.queue", "not a valid object name"),
    (f"targets.k8s.queue={'q' * 64}", "targets.k8s.queue", "at most 63 characters"),
])
def test_hostile_spec_values_are_refused_with_a_clear_message(setting, field, says):
    with pytest.raises(SpecError) as caught:
        job_for(setting)
    assert any(p.path == field and says in p.message for p in caught.value.problems), str(caught.value)


def test_a_queued_rayjob_carries_the_kueue_label_and_is_created_suspended_valid_against_the_crd():
    """Kueue admits a RayJob by unsuspending it: created running, its pods would start before any quota check."""
    documents = list(yaml.safe_load_all(k8s.render_manifests(job_for("targets.k8s.queue=acme-queue"))))
    assert_valid(documents)
    configmap, rayjob = documents
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "acme-queue"
    assert rayjob["spec"]["suspend"] is True
    # only the RayJob is queued: a labelled pod or ConfigMap would be a second Workload to Kueue
    assert "kueue.x-k8s.io/queue-name" not in configmap["metadata"]["labels"]
    assert all("kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"] for pod in pods_of(rayjob).values())
    unqueued = k8s.manifests(job_for())[1]
    assert "suspend" not in unqueued["spec"] and "kueue.x-k8s.io/queue-name" not in unqueued["metadata"]["labels"]


def test_local_files_are_refused_because_pods_cannot_read_them(tmp_path, stub_model_dir):
    model = stub_model_dir
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    job = job_for(f"model.path={model}", f"data.train={data}", f"storage.uri={tmp_path / 'runs'}")
    with pytest.raises(TargetError) as caught:
        k8s.render_manifests(job)
    assert "storage.uri" in str(caught.value) and "model.path" in str(caught.value) and "s3://" in str(caught.value)


def test_the_trainer_is_told_tls_verification_and_addressing_on_its_command_line():
    """It reads job.yaml before it knows the spec's storage settings. (A private CA's file is a local path the
    pods cannot read: refused like the others above.)"""
    job = job_for("storage.verify_tls=false", "storage.addressing_style=path")
    [rayjob] = [d for d in yaml.safe_load_all(k8s.render_manifests(job)) if d["kind"] == "RayJob"]
    assert rayjob["spec"]["entrypoint"].endswith(
        "--endpoint-url http://minio.storage:9000 --no-verify-tls --addressing-style path")


# ── expected files ──────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_shipped_examples_render_as_the_reviewed_expected_files(example):
    expected = EXPECTED / f"{example.stem}.yaml"
    text = render_example(example)
    assert_valid(list(yaml.safe_load_all(text)))
    if os.environ.get("TUNERUN_REGENERATE"):
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(text)
    assert expected.is_file() and text == expected.read_text(), (
        f"{example.name} renders differently from {expected.relative_to(REPO)}; if the change is intended, "
        "regenerate: TUNERUN_REGENERATE=1 python -m pytest tests/cluster/test_k8s_render.py")


def test_the_container_recipe_installs_tunerun_and_runs_as_the_default_uid():
    from tunerun.cluster.k8s import KubeRaySettings

    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).group(1) == str(KubeRaySettings().run_as_user)
    assert "pip install /src/tunerun" in dockerfile and "--index-url" in dockerfile
