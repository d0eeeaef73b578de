"""`KubeApi`'s calls for the Deployments and Services `tunerun serve` makes for full fine-tunes' engines
(`tunerun.jobs.service.k8s_engines`), over HTTP: the real `kubernetes` client against the fake API server of
test_k8s_submit.py (no Kubernetes API server can run here), which records each request and answers as kube-apiserver
does. The pool that uses these calls is tested in tests/jobs/service/test_k8s_engines.py."""
from __future__ import annotations

import pytest
from test_k8s_submit import FakeApiServer, api  # noqa: F401  (the fixture: a kubeconfig pointing at the fake)

from tunerun.cluster.k8s import KubeApi
from tunerun.jobs.errors import TargetError

LABELS = {"app.kubernetes.io/component": "vllm-full-fine-tune", "tunerun/job-id": "ftjob-" + "a" * 24}
DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "tunerun-full-one", "namespace": "ml-jobs", "labels": LABELS},
              "spec": {"replicas": 1, "selector": {"matchLabels": LABELS},
                       "template": {"metadata": {"labels": LABELS},
                                    "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0"}]}}}}
SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "tunerun-full-one", "namespace": "ml-jobs", "labels": LABELS},
           "spec": {"selector": LABELS, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}}


def test_deployments_and_services_are_created_listed_read_and_deleted_at_their_api_paths(api: FakeApiServer):
    kube = KubeApi()
    created = kube.create_served(DEPLOYMENT)
    assert created["metadata"]["uid"] and created["spec"]["template"]["spec"]["containers"][0]["name"] == "vllm"
    assert kube.create_served(SERVICE)["spec"]["ports"][0]["targetPort"] == "http"
    assert kube.create_served(DEPLOYMENT) is None  # 409: there already
    selector = "app.kubernetes.io/component=vllm-full-fine-tune"
    listed = kube.list_served("Deployment", "ml-jobs", selector)
    assert [d["metadata"]["labels"]["tunerun/job-id"] for d in listed] == [LABELS["tunerun/job-id"]]
    assert kube.list_served("Service", "ml-jobs", "app.kubernetes.io/component=other") == []
    assert kube.get_served("Deployment", "ml-jobs", "tunerun-full-one")["metadata"]["uid"] == created["metadata"]["uid"]
    assert kube.get_served("Deployment", "ml-jobs", "missing") is None
    assert kube.delete_served("Deployment", "ml-jobs", "tunerun-full-one") is True
    assert kube.delete_served("Service", "ml-jobs", "tunerun-full-one") is True
    assert kube.delete_served("Service", "ml-jobs", "tunerun-full-one") is False  # gone already
    assert api.calls() == [
        ("POST", "/apis/apps/v1/namespaces/ml-jobs/deployments"), ("POST", "/api/v1/namespaces/ml-jobs/services"),
        ("POST", "/apis/apps/v1/namespaces/ml-jobs/deployments"),
        ("GET", "/apis/apps/v1/namespaces/ml-jobs/deployments"),
        ("GET", "/api/v1/namespaces/ml-jobs/services"),
        ("GET", "/apis/apps/v1/namespaces/ml-jobs/deployments/tunerun-full-one"),
        ("GET", "/apis/apps/v1/namespaces/ml-jobs/deployments/missing"),
        ("DELETE", "/apis/apps/v1/namespaces/ml-jobs/deployments/tunerun-full-one"),
        ("DELETE", "/api/v1/namespaces/ml-jobs/services/tunerun-full-one"),
        ("DELETE", "/api/v1/namespaces/ml-jobs/services/tunerun-full-one")]
    assert api.requests[0]["query"] == {} and api.requests[3]["query"]["labelSelector"] == [selector]
    assert api.requests[-1]["body"]["propagationPolicy"] == "Background"


def test_a_refusal_names_the_object_and_what_to_do(api: FakeApiServer, monkeypatch):
    monkeypatch.setattr(api, "answer", lambda *args: api.status(403, "Forbidden", 'deployments.apps is forbidden: '
                                                                "User cannot create resource"))
    with pytest.raises(TargetError, match=r"create Deployment ml-jobs/tunerun-full-one: 403 deployments.apps is "
                                          r"forbidden.*render its Role again with `tunerun serve render`"):
        KubeApi().create_served(DEPLOYMENT)
