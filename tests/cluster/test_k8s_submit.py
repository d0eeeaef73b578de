"""Submitting to Kubernetes: the HTTP exchange of `tunerun submit/status/cancel/logs --target k8s`.

No Kubernetes API server runs on this machine. These tests start a small fake of one on loopback — a real HTTP
server that records every request and answers create/get/patch/delete of ConfigMaps and RayJobs (and the
submitter pod's log) the way the API server does — and point the real `kubernetes` client at it through a
kubeconfig file. They prove what tunerun sends (objects, order, credentials from the kubeconfig) and how it
reads the answers and errors; whether a cluster accepts the objects is what the schema tests in
test_k8s_render.py prove. The run folder lives on the S3 protocol server (moto on loopback), as on a cluster.
"""
from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from click.testing import CliRunner

from tunerun.cluster import k8s
from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.runs import update_info
from tunerun.jobs.cli import main
from tunerun.cluster.targets import job_model
from tunerun.jobs.errors import TargetError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import ResolvedJob, resolve

TARGET = k8s.KubeRayTarget()

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
TOKEN = "fake-bearer-token"


class FakeApiServer:
    """Answers like kube-apiserver for the paths tunerun uses; ``requests`` is the recorded exchange."""

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}  # "configmaps/<ns>/<name>" or "rayjobs/<ns>/<name>" → object
        self.rayjob_status: dict = {}
        self.missing_kinds: set[str] = set()  # e.g. {"rayjobs"}: the KubeRay operator is not installed
        self.pods: dict[str, str] = {}  # pod name → its log
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def _handle(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                        "body": body, "authorization": self.headers.get("Authorization")})
                status, answer = server.answer(self.command, url.path, parse_qs(url.query), body)
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(answer, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}

    def answer(self, method: str, path: str, query: dict, body) -> tuple[int, dict | bytes]:
        parts = path.strip("/").split("/")
        # /api/v1/namespaces/<ns>/<kind>[/<name>[/log]]  or  /apis/ray.io/v1/namespaces/<ns>/rayjobs[/<name>]
        base = 3 if parts[0] == "api" else 4
        if len(parts) < base + 2 or parts[base - 1] != "namespaces":
            return self.status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace, kind = parts[base], parts[base + 1]
        name = parts[base + 2] if len(parts) > base + 2 else None
        if kind in self.missing_kinds:
            return self.status(404, "NotFound", "the server could not find the requested resource")
        if kind == "pods":
            return self.answer_pods(namespace, name, query)
        if method == "GET" and name is None:
            return self.answer_list(namespace, kind, query)
        key = f"{kind}/{namespace}/{name or (body or {}).get('metadata', {}).get('name')}"
        if method == "POST":
            if key in self.objects:
                return self.status(409, "AlreadyExists", f'{kind} "{key.split("/")[-1]}" already exists')
            created = json.loads(json.dumps(body))
            created["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1",
                                       creationTimestamp="2026-11-23T10:15:00Z")
            self.objects[key] = created
            return 201, created
        if key not in self.objects:
            return self.status(404, "NotFound", f'{kind} "{name}" not found')
        if method == "GET":
            return 200, {**self.objects[key], "status": self.rayjob_status} if kind == "rayjobs" else self.objects[key]
        if method == "PUT":
            self.objects[key] = body
            return 200, body
        if method == "PATCH":
            self.objects[key]["metadata"].update(body["metadata"])
            return 200, self.objects[key]
        if method == "DELETE":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return self.status(405, "MethodNotAllowed", method)

    def answer_pods(self, namespace: str, name: str | None, query: dict) -> tuple[int, dict | bytes]:
        if name is None:
            selector = query.get("labelSelector", [""])[0]
            items = [{"metadata": {"name": pod, "namespace": namespace, "creationTimestamp": "2026-11-23T10:15:00Z",
                                   "labels": {"job-name": selector.split("=", 1)[1]}}} for pod in self.pods]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        return 200, self.pods[name].encode()

    def answer_list(self, namespace: str, kind: str, query: dict) -> tuple[int, dict]:
        """A collection, filtered by an equality ``labelSelector`` (``key=value``) as the API server does."""
        key, _, value = query.get("labelSelector", [""])[0].partition("=")
        items = [o for k, o in self.objects.items() if k.startswith(f"{kind}/{namespace}/")
                 and (not key or o["metadata"].get("labels", {}).get(key) == value)]
        return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The fake API server and a kubeconfig whose current context points at it with a bearer token."""
    server = FakeApiServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "me", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": "default"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield server
    server.close()


@pytest.fixture
def storage(s3_server, monkeypatch) -> list[str]:
    bucket = s3_server.bucket(f"k8s-{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)  # for the CLI's status/cancel/logs
    return [f"storage.uri=s3://{bucket}/team", f"storage.endpoint_url={s3_server.endpoint}",
            f"model.path=s3://{bucket}/models/tiny/", f"data.train=s3://{bucket}/data/train.jsonl",
            "targets.k8s.s3_secret=s3-credentials", "targets.k8s.namespace=ml-jobs"]


def make_job(storage: list[str], run_id: str = "demo-20261123-101500", *sets: str) -> ResolvedJob:
    return resolve(load_job(str(QUICKSTART), [*storage, *sets], model=job_model()), run_id=run_id)


def test_submit_creates_configmap_then_rayjob_and_records_them_in_the_run_folder(api, storage):
    job = make_job(storage)
    run = TARGET.submit(job)
    configmap, rayjob = k8s.manifests(job)
    assert api.calls() == [("POST", "/api/v1/namespaces/ml-jobs/configmaps"),
                           ("POST", "/apis/ray.io/v1/namespaces/ml-jobs/rayjobs"),
                           ("PATCH", "/api/v1/namespaces/ml-jobs/configmaps/demo-20261123-101500-job")]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in api.requests)  # the kubeconfig's user
    assert api.requests[0]["body"] == configmap and api.requests[1]["body"] == rayjob
    owner = api.objects["configmaps/ml-jobs/demo-20261123-101500-job"]["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "RayJob" and owner["uid"] == api.objects["rayjobs/ml-jobs/demo-20261123-101500"][
        "metadata"]["uid"]
    info = run.read_json("run.json")
    assert info["target"] == "k8s" and info["state"] == "pending"
    assert info["k8s"]["rayjob"] == "demo-20261123-101500" and info["k8s"]["namespace"] == "ml-jobs"
    assert info["k8s"]["context"] == "fake"
    # the entrypoint in the pod reads the same job from the run folder that the ConfigMap carries
    assert ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml"))) == job
    assert [e["event"] for e in run.read_jsonl("events.jsonl")] == ["run_created", "k8s_submitted"]


def test_status_adds_the_rayjob_view_and_a_rayjob_that_failed_alone_fails_the_run(api, storage):
    run = TARGET.submit(make_job(storage))
    api.rayjob_status = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
    info = TARGET.status(run)
    assert info.state == "pending" and TARGET.handle(info).job_status == "RUNNING"
    assert TARGET.handle(info).deployment_status == "Running"
    assert api.requests[-1]["path"] == "/apis/ray.io/v1/namespaces/ml-jobs/rayjobs/demo-20261123-101500"

    api.rayjob_status = {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                         "message": "the RayJob has passed the activeDeadlineSeconds"}
    info = TARGET.status(run)
    assert info.state == "failed" and "DeadlineExceeded" in info.error and "activeDeadline" in info.error
    assert run.read_json("run.json")["state"] == "pending"  # status reads; the driver writes


def test_cancel_deletes_the_rayjob_and_configmap_and_marks_the_run_cancelled(api, storage):
    run = TARGET.submit(make_job(storage))
    assert TARGET.cancel(run) is True
    deletes = [r for r in api.requests if r["method"] == "DELETE"]
    assert [r["path"] for r in deletes] == ["/apis/ray.io/v1/namespaces/ml-jobs/rayjobs/demo-20261123-101500",
                                            "/api/v1/namespaces/ml-jobs/configmaps/demo-20261123-101500-job"]
    assert deletes[0]["body"]["propagationPolicy"] == "Background"
    assert run.read_json("run.json")["state"] == "cancelled" and not api.objects
    assert TARGET.handle(TARGET.status(run)).deployment_status == "deleted"
    assert TARGET.cancel(run) is False  # nothing left to delete


def test_a_resumed_run_replaces_its_earlier_configmap_and_creates_a_new_rayjob(api, storage):
    job = make_job(storage)
    run = TARGET.submit(job)
    del api.objects["rayjobs/ml-jobs/demo-20261123-101500"]  # TTL after the end; the ConfigMap stayed behind
    update_info(run, state="preempted")
    TARGET.submit(job, resume=True)
    # first the target is asked whether the earlier attempt still runs (the RayJob is gone: it does not)
    assert api.calls()[3:] == [("GET", "/apis/ray.io/v1/namespaces/ml-jobs/rayjobs/demo-20261123-101500"),
                               ("POST", "/api/v1/namespaces/ml-jobs/configmaps"),
                               ("PUT", "/api/v1/namespaces/ml-jobs/configmaps/demo-20261123-101500-job"),
                               ("POST", "/apis/ray.io/v1/namespaces/ml-jobs/rayjobs"),
                               ("PATCH", "/api/v1/namespaces/ml-jobs/configmaps/demo-20261123-101500-job")]
    assert run.read_json("run.json")["state"] == "pending"


def test_an_existing_rayjob_is_a_clear_error_and_the_run_says_it_failed(api, storage):
    job = make_job(storage)
    api.objects["rayjobs/ml-jobs/demo-20261123-101500"] = {"metadata": {"name": "demo-20261123-101500"}}
    with pytest.raises(TargetError, match="409.*already exists.*tunerun cancel"):
        TARGET.submit(job)
    info = RunFolder(job.spec.storage, job.run_id).read_json("run.json")
    assert info["state"] == "failed" and "already exists" in info["error"]


def test_a_cluster_without_kuberay_is_told_to_install_the_operator(api, storage):
    api.missing_kinds.add("rayjobs")
    with pytest.raises(TargetError, match="install the KubeRay operator"):
        TARGET.submit(make_job(storage))


def test_an_unreachable_api_server_fails_in_seconds_with_its_address(api, storage, tmp_path, monkeypatch):
    api.close()
    with pytest.raises(TargetError, match=f"cannot reach the Kubernetes API server at {api.url}"):
        TARGET.submit(make_job(storage))


def test_no_kubeconfig_and_no_service_account_is_a_clear_error(storage, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(TargetError, match="no Kubernetes configuration"):
        TARGET.submit(make_job(storage))


def test_cli_submit_status_logs_cancel(api, storage, tmp_path):
    runner = CliRunner()
    sets = [arg for s in storage for arg in ("--set", s)]
    submitted = runner.invoke(main, ["submit", str(QUICKSTART), "--target", "k8s", "--run-id", "cli-1", *sets])
    assert submitted.exit_code == 0, submitted.output
    assert "submitted cli-1 · k8s · RayJob ml-jobs/cli-1" in submitted.output
    store = ["--storage", storage[0].split("=", 1)[1]]

    api.pods["cli-1-abcde"] = "Running entrypoint for job cli-1\nstep 1/68 loss 3.2\n"
    logs = runner.invoke(main, ["logs", "cli-1", *store])
    assert logs.exit_code == 0 and "step 1/68 loss 3.2" in logs.output, logs.output
    pod_list = next(r for r in api.requests if r["path"] == "/api/v1/namespaces/ml-jobs/pods")
    assert pod_list["query"]["labelSelector"] == ["job-name=cli-1"]

    cancelled = runner.invoke(main, ["cancel", "cli-1", *store])
    assert cancelled.exit_code == 0 and "cancelled cli-1" in cancelled.output
    again = runner.invoke(main, ["cancel", "cli-1", *store])
    assert "not running (state cancelled)" in again.output


def test_cli_render_prints_what_kubectl_apply_takes(storage):
    result = CliRunner().invoke(main, ["render", str(QUICKSTART), "--target", "k8s", "--run-id", "r-1",
                                       *[arg for s in storage for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(result.output)] == ["ConfigMap", "RayJob"]
    slurm = CliRunner().invoke(main, ["render", str(QUICKSTART), "--target", "slurm", "--run-id", "r-1",
                                      *[arg for s in storage for arg in ("--set", s)]])
    assert slurm.exit_code == 0, slurm.output
    assert slurm.output.startswith("#!/bin/bash") and "#SBATCH --job-name=quickstart" in slurm.output


def test_adopt_in_the_head_pod_starts_a_kubectl_applied_run_and_notes_a_retry(storage, tmp_path, monkeypatch):
    """`kubectl apply` of a rendered manifest: only the ConfigMap has the job, so the pod writes the run folder;
    a RayJob retry (new Ray cluster, same run id) finds it and only leaves an event, then resumes."""
    job = make_job(storage, "applied-1")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(k8s.manifests(job)[0]["data"]["job.yaml"])
    monkeypatch.setenv("TUNERUN_K8S_RAYJOB", "applied-1")
    monkeypatch.setenv("TUNERUN_K8S_NAMESPACE", "ml-jobs")
    assert k8s.main(["adopt", str(job_file)]) == 0
    run = RunFolder(job.spec.storage, job.run_id)
    info = run.read_json("run.json")
    assert info["target"] == "k8s" and info["k8s"] == {"namespace": "ml-jobs", "rayjob": "applied-1",
                                                       "configmap": "applied-1-job"}
    assert ResolvedJob.model_validate(yaml.safe_load(run.read_text("job.yaml"))) == job
    update_info(run, state="running", started_at=1.0)  # the first attempt started, then its cluster died
    assert k8s.main(["adopt", str(job_file)]) == 0
    assert [e["event"] for e in run.read_jsonl("events.jsonl")] == ["run_created", "run_relaunched"]


# ── Kueue ───────────────────────────────────────────────────────────────────────────────────────────────────

QUOTA_MESSAGE = ("couldn't assign flavors to pod set head: insufficient unused quota for cpu in flavor default-flavor, "
                 "3 more needed")


def kueue_workload(rayjob: dict, suffix: str, **conditions: tuple[str, str, str]) -> dict:
    """A Workload as Kueue writes it for a RayJob: named from it, owned by it, labelled with its uid, and its
    conditions ({type: (status, reason, message)})."""
    meta = rayjob["metadata"]
    return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": f"rayjob-{meta['name']}-{suffix}", "namespace": meta["namespace"],
                         "creationTimestamp": "2026-11-23T10:15:01Z",
                         "labels": {"kueue.x-k8s.io/job-uid": meta["uid"],
                                    "kueue.x-k8s.io/queue-name": meta["labels"]["kueue.x-k8s.io/queue-name"]},
                         "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayJob", "name": meta["name"],
                                              "uid": meta["uid"], "controller": True}]},
            "spec": {"queueName": meta["labels"]["kueue.x-k8s.io/queue-name"]},
            "status": {"conditions": [{"type": kind, "status": status, "reason": reason, "message": message,
                                       "lastTransitionTime": "2026-11-23T10:15:02Z"}
                                      for kind, (status, reason, message) in conditions.items()]}}


def waiting_reasons(run: RunFolder) -> list[str]:
    return [e["reason"] for e in run.read_jsonl("events.jsonl") if e["event"] == "run_waiting"]


def test_a_queued_rayjob_is_created_suspended_and_waits_with_kueues_reason_in_status_and_events(api, storage):
    from tunerun.jobs.service import objects

    run = TARGET.submit(make_job(storage, "demo-20261123-101500", "targets.k8s.queue=acme-queue"))
    key = "rayjobs/ml-jobs/demo-20261123-101500"
    created = api.objects[key]
    assert created["spec"]["suspend"] is True
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "acme-queue"
    assert run.read_json("run.json")["k8s"]["queue"] == "acme-queue"
    api.rayjob_status = {"jobDeploymentStatus": "Suspended"}

    info = TARGET.status(run)  # Kueue has not made the Workload yet
    assert info.state == "pending" and "no Workload yet" in TARGET.handle(info).waiting
    listed = api.requests[-1]
    assert listed["path"] == "/apis/kueue.x-k8s.io/v1beta1/namespaces/ml-jobs/workloads"
    assert listed["query"]["labelSelector"] == [f"kueue.x-k8s.io/job-uid={created['metadata']['uid']}"]

    other = {**created, "metadata": {**created["metadata"], "name": "someone-else", "uid": "another-uid"}}
    api.objects["workloads/ml-jobs/rayjob-someone-else-1a2b3"] = kueue_workload(other, "1a2b3", QuotaReserved=(
        "False", "Pending", "a message about another job"))
    api.objects["workloads/ml-jobs/rayjob-demo-20261123-101500-9f8e7"] = kueue_workload(
        created, "9f8e7", QuotaReserved=("False", "Pending", QUOTA_MESSAGE))
    for _ in range(2):  # asked twice, recorded once: an event is news
        info = TARGET.status(run)
    assert info.state == "pending"
    assert TARGET.handle(info).waiting == f"waiting in Kueue LocalQueue acme-queue: {QUOTA_MESSAGE}"
    assert len(waiting_reasons(run)) == 2 and waiting_reasons(run)[-1].endswith(QUOTA_MESSAGE)
    assert QUOTA_MESSAGE in TARGET.view(info)
    shown = [e["message"] for e in objects.events(run)]  # the job's events, as the service's API lists them
    assert f"Job queued in the cluster: waiting in Kueue LocalQueue acme-queue: {QUOTA_MESSAGE}" in shown

    # admitted: Kueue unsuspends the RayJob; a running RayJob costs no Workload read and waits no more
    api.objects["workloads/ml-jobs/rayjob-demo-20261123-101500-9f8e7"] = kueue_workload(
        created, "9f8e7", QuotaReserved=("True", "QuotaReserved", "Quota reserved in ClusterQueue acme"),
        Admitted=("True", "Admitted", "The workload is admitted"))
    api.objects[key]["spec"]["suspend"] = False
    api.rayjob_status = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    asked = len(api.requests)
    info = TARGET.status(run)
    assert api.calls()[asked:] == [("GET", "/apis/ray.io/v1/namespaces/ml-jobs/rayjobs/demo-20261123-101500")]
    assert TARGET.handle(info).waiting is None and len(waiting_reasons(run)) == 2


def test_an_evicted_workload_says_why_and_a_cluster_without_kueue_says_so(api, storage):
    run = TARGET.submit(make_job(storage, "demo-20261123-101500", "targets.k8s.queue=acme-queue"))
    created = api.objects["rayjobs/ml-jobs/demo-20261123-101500"]
    api.objects["workloads/ml-jobs/w"] = kueue_workload(created, "w", QuotaReserved=(
        "False", "Pending", "waiting for the cohort"), Evicted=("True", "Preempted", "Preempted to accommodate a "
                                                                  "workload in the cohort"))
    assert "Preempted to accommodate" in TARGET.handle(TARGET.status(run)).waiting
    api.missing_kinds.add("workloads")
    error = TARGET.handle(TARGET.status(run)).error
    assert "no Kueue Workload resource" in error and "install Kueue" in error
