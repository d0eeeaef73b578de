"""Before training: is the MLflow tracking server of ``tracking.mlflow`` there, and does it take our credentials?

`tunerun validate`, `run` and `submit` ask it once, over plain HTTP (MLflow's REST API, no mlflow import), so a
wrong address or a missing token fails in a second with the field named, instead of a run training untracked.
Credentials come only from MLflow's standard variables, by name; their values are sent, never printed.
"""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request

from tunerun.jobs.errors import Problem, SpecError
from tunerun.jobs.spec import MlflowSpec

PROBE_TIMEOUT_S = 5.0
CREDENTIALS_HINT = ("set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, in the "
                    "environment that runs tunerun (by name on every target; never in the spec)")


def auth_header(environ=os.environ) -> dict[str, str]:
    """The Authorization header MLflow's own client would send for these variables."""
    token = environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def credential_problem(environ=os.environ) -> str | None:
    """Half a user name / password pair: MLflow would silently send no credentials at all."""
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    if bool(user) != bool(password):
        have, lack = ("USERNAME", "PASSWORD") if user else ("PASSWORD", "USERNAME")
        return f"MLFLOW_TRACKING_{have} is set but MLFLOW_TRACKING_{lack} is not: set both (or MLFLOW_TRACKING_TOKEN)"
    return None


def server_problem(settings: MlflowSpec, environ=os.environ) -> str | None:
    """Why the server cannot take this job's run (unreachable, refuses the credentials, not MLflow), or None."""
    query = urllib.parse.urlencode({"experiment_name": settings.experiment})
    url = f"{settings.tracking_uri}/api/2.0/mlflow/experiments/get-by-name?{query}"
    request = urllib.request.Request(url, headers=auth_header(environ))
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            json.loads(response.read() or b"{}")
            return None
    except urllib.error.HTTPError as exc:
        return _http_problem(exc, settings, environ)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return (f"{settings.tracking_uri} is unreachable ({reason}); check the address and that the server runs, "
                "or set tracking.mlflow.check_reachable: false when only the cluster can reach it")
    except ValueError:
        return f"{settings.tracking_uri} answered, but not as an MLflow tracking server (no JSON from its REST API)"


def _http_problem(exc: urllib.error.HTTPError, settings: MlflowSpec, environ) -> str | None:
    if exc.code in (401, 403):
        if auth_header(environ):
            return f"{settings.tracking_uri} refused the credentials (HTTP {exc.code}); check their values"
        return f"{settings.tracking_uri} asks for credentials (HTTP {exc.code}): {CREDENTIALS_HINT}"
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if exc.code == 404 and body.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
        return None  # the experiment does not exist yet: the run's start creates it
    return (f"{settings.tracking_uri} answered HTTP {exc.code} to MLflow's REST API: is it an MLflow tracking "
            "server (give its root address, without /api or #/)?")


def check_tracking(job, source: str, environ=os.environ) -> None:
    """Raise a `SpecError` naming ``tracking.mlflow.*`` when the server or the credentials would fail the run."""
    settings = job.spec.tracking.mlflow
    if settings is None:
        return
    problems = []
    credentials = credential_problem(environ)
    if credentials:
        problems.append(Problem("tracking.mlflow", credentials))
    elif settings.check_reachable:
        found = server_problem(settings, environ)
        if found:
            problems.append(Problem("tracking.mlflow.tracking_uri", found))
    if problems:
        raise SpecError(source, problems)


def end_mlflow_run(settings: MlflowSpec, mlflow_run_id: str, status: str, environ=os.environ) -> str | None:
    """Set an MLflow run's final status over the REST API (``runs/update``); why it failed, or None.

    `tunerun cancel` needs it: the target may kill the driver before the driver can close its MLflow run."""
    import time

    body = json.dumps({"run_id": mlflow_run_id, "status": status, "end_time": int(time.time() * 1000)}).encode()
    request = urllib.request.Request(f"{settings.tracking_uri}/api/2.0/mlflow/runs/update", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **auth_header(environ)})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return None
    except (urllib.error.URLError, OSError) as exc:
        return f"{settings.tracking_uri}: {getattr(exc, 'reason', exc)}"
