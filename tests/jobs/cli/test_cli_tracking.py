"""`tunerun validate` asks the MLflow server of tracking.mlflow before anything trains: a wrong address, a server
that wants credentials, or half a user name / password pair is exit 2 with the field named and what to do."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import urllib.error
import urllib.request
import uuid

import pytest

GOOD = """\
name: demo
model:
  path: ./models/m
data:
  train: data/train.jsonl
tracking:
  mlflow: {{tracking_uri: "{uri}", experiment: {experiment}, tags: {{team: support}}}}
  tensorboard: true
"""


@pytest.fixture
def workdir(tmp_path, stub_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50)))
    return tmp_path


def validate(tunerun, workdir, uri: str, experiment: str = "acme-support", **env: str):
    (workdir / "job.yaml").write_text(GOOD.format(uri=uri, experiment=experiment))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return tunerun("validate", "job.yaml", cwd=workdir, env={**clean, **env}, timeout=60)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


class _RecordingProxy(http.server.BaseHTTPRequestHandler):
    """Passes each GET on to the real MLflow server and notes (path, its status, its body): what the check asked."""

    upstream: str
    seen: list

    def do_GET(self):  # noqa: N802 - the http.server API
        request = urllib.request.Request(self.upstream + self.path, headers={
            k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as refused:
            status, body = refused.code, refused.read()
        self.seen.append((self.path, status, body))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_reachable_server_is_asked_and_validates(tunerun, workdir, mlflow_server):
    """The real server is asked for the job's experiment (which does not exist yet: MLflow's 404
    RESOURCE_DOES_NOT_EXIST is a pass, the run's start creates it). Exit 0 alone would also pass with no check."""
    seen, experiment = [], f"never-created-{uuid.uuid4().hex[:8]}"  # the server is shared with runs that log
    handler = type("Proxy", (_RecordingProxy,), {"upstream": mlflow_server.uri, "seen": seen})
    with serving(handler) as uri:
        result = validate(tunerun, workdir, uri, experiment=experiment)
    assert result.returncode == 0, result.stderr
    asked = [(path, status) for path, status, _ in seen]
    assert asked == [(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", 404)], seen
    assert json.loads(seen[0][2])["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_unreachable_uri_is_refused_before_training(tunerun, workdir, free_port):
    result = validate(tunerun, workdir, f"http://127.0.0.1:{free_port()}")
    assert_user_error(result, "tracking.mlflow.tracking_uri", "unreachable", "check_reachable: false")


def _answering(status: int, body: bytes, content_type: str):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Answer


@pytest.mark.parametrize("status, body, content_type, fragment", [
    (404, b"<html>Not Found</html>", "text/html", "answered HTTP 404 to MLflow's REST API"),  # a web server, or /#/
    (200, b"<html>welcome</html>", "text/html", "answered, but not as an MLflow tracking server"),
    (404, b'{"error_code": "ENDPOINT_NOT_FOUND"}', "application/json", "answered HTTP 404"),
])
def test_a_server_that_is_not_mlflow_is_refused(tunerun, workdir, status, body, content_type, fragment):
    """The check reads the answer: reaching *a* server is not enough."""
    with serving(_answering(status, body, content_type)) as uri:
        result = validate(tunerun, workdir, uri)
    assert_user_error(result, "tracking.mlflow.tracking_uri", fragment)


def test_half_a_credential_pair_is_refused(tunerun, workdir, mlflow_server):
    result = validate(tunerun, workdir, mlflow_server.uri, MLFLOW_TRACKING_USERNAME="ci")
    assert_user_error(result, "tracking.mlflow", "MLFLOW_TRACKING_PASSWORD is not")
    assert "ci" not in result.stderr.replace("MLFLOW", "")  # no values in messages


class _AuthProxyStandIn(http.server.BaseHTTPRequestHandler):
    """What an MLflow server behind authentication answers a request without credentials (HTTP 401)."""

    def do_GET(self):  # noqa: N802 - the http.server API
        ok = self.headers.get("Authorization") == "Bearer right-token"
        self.send_response(404 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST"} if ok else {}).encode())

    def log_message(self, *args):
        pass


def test_server_asking_for_credentials_names_the_variables(tunerun, workdir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthProxyStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert_user_error(validate(tunerun, workdir, uri), "asks for credentials", "MLFLOW_TRACKING_TOKEN")
        assert_user_error(validate(tunerun, workdir, uri, MLFLOW_TRACKING_TOKEN="wrong"), "refused the credentials")
        assert validate(tunerun, workdir, uri, MLFLOW_TRACKING_TOKEN="right-token").returncode == 0
    finally:
        server.shutdown()


def test_credentials_in_the_uri_are_refused(tunerun, workdir):
    result = validate(tunerun, workdir, "http://user:secret@mlflow:5000")
    assert_user_error(result, "tracking.mlflow.tracking_uri", "MLFLOW_TRACKING_USERNAME")
    assert "secret" not in result.stderr.replace("(got", "")
