"""`tunerun validate` asks the MLflow server of tracking.mlflow before anything trains: a wrong address, a server
that wants credentials, or half a user name / password pair is exit 2 with the field named and what to do."""
from __future__ import annotations

import http.server
import json
import os
import threading

import pytest

GOOD = """\
name: demo
model:
  path: ./models/m
data:
  train: data/train.jsonl
tracking:
  mlflow: {{tracking_uri: "{uri}", experiment: acme-support, tags: {{team: support}}}}
  tensorboard: true
"""


@pytest.fixture
def workdir(tmp_path, stub_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(50)))
    return tmp_path


def validate(tunerun, workdir, uri: str, **env: str):
    (workdir / "job.yaml").write_text(GOOD.format(uri=uri))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return tunerun("validate", "job.yaml", cwd=workdir, env={**clean, **env}, timeout=60)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_reachable_server_validates(tunerun, workdir, mlflow_server):
    result = validate(tunerun, workdir, mlflow_server.uri)
    assert result.returncode == 0, result.stderr


def test_unreachable_uri_is_refused_before_training(tunerun, workdir, free_port):
    result = validate(tunerun, workdir, f"http://127.0.0.1:{free_port()}")
    assert_user_error(result, "tracking.mlflow.tracking_uri", "unreachable", "check_reachable: false")


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
