"""The target contract, the registry and run state, with real processes standing in for a driver.

The local target's driver is a child process; here a `sleep` plays it, so status, cancel and logs are checked
against a real pid (alive, gone without an outcome, on another host) without starting Ray. Training through the
local target end to end is in tests/e2e.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from tunerun.cluster import targets
from tunerun.cluster.local import LocalTarget
from tunerun.cluster.run_folder import RunFolder
from tunerun.cluster.runs import Handle, RunState, create_run, read_info, record_cancelled, update_info
from tunerun.jobs.errors import SpecError, StorageError, TargetError
from tunerun.jobs.loader import load_job_text
from tunerun.jobs.spec import MlflowSpec


@pytest.fixture
def sleeper():
    """A child process that stands in for a local driver; killed at the end whatever happened."""
    process = subprocess.Popen([sys.executable, "-c", "import time; print('driver says hello', flush=True); "
                                "time.sleep(120)"], stdout=subprocess.PIPE, start_new_session=True)
    process.stdout.readline()
    yield process
    process.kill()
    process.wait()


def local_run(job, pid: int, log: Path, host: str | None = None) -> RunFolder:
    run = create_run(job, "local")
    update_info(run, local={"pid": pid, "log": str(log), "host": host or socket.gethostname()})
    return run


# ── the registry ────────────────────────────────────────────────────────────────────────────────────────────

def test_the_registry_serves_every_target_behind_the_same_contract():
    assert targets.names() == ("local", "ray", "slurm", "k8s")
    for name in targets.names():
        target = targets.get(name)
        assert isinstance(target, targets.Target) and target.name == name
        assert issubclass(target.Handle, Handle) and target.Handle.__module__ == type(target).__module__
    assert targets.renderable() == ("ray", "slurm", "k8s")  # local starts the trainer itself: nothing to show


NOMAD = """
from pydantic import Field

from tunerun.cluster.runs import Handle
from tunerun.cluster.targets import Target
from tunerun.jobs.spec import Strict


class NomadSettings(Strict):
    datacenter: str = "dc1"
    priority: int = Field(50, ge=1, le=100)


class NomadHandle(Handle):
    eval_id: str


class NomadTarget(Target):
    name = "nomad"
    Handle = NomadHandle
    Settings = NomadSettings

    def submit(self, job, resume=False):
        raise NotImplementedError

    def observe(self, info):
        return None

    def stop(self, info):
        return False
"""


@pytest.fixture
def nomad_registered(tmp_path, monkeypatch):
    """A target added the way the README says: one module and one line in the registry."""
    (tmp_path / "nomad_target.py").write_text(NOMAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(targets.REGISTRY, "nomad", "nomad_target:NomadTarget")
    targets.settings_model.cache_clear()
    targets.job_model.cache_clear()
    yield
    targets.settings_model.cache_clear()  # rebuilt from the restored registry on next use
    targets.job_model.cache_clear()


def test_a_new_target_declares_its_settings_and_the_spec_checks_them(nomad_registered):
    minimal = "name: demo\nmodel: {path: ./m}\ndata: {train: d.jsonl}\n"
    spec = load_job_text(minimal + "targets:\n  nomad: {datacenter: eu-west}\n", model=targets.job_model())
    settings = targets.get("nomad").settings(spec)
    assert (type(settings).__name__, settings.datacenter, settings.priority) == ("NomadSettings", "eu-west", 50)
    assert targets.get("slurm").settings(spec).time == "04:00:00"  # the others keep their defaults
    with pytest.raises(SpecError) as caught:
        load_job_text(minimal + "targets:\n  nomad:\n    priorty: 500\n  slurm: {time: soon}\n", "job.yaml",
                      model=targets.job_model())
    problems = {(p.path, p.line): p.message for p in caught.value.problems}
    assert problems[("targets.nomad.priorty", 6)] == "unknown key — did you mean 'priority'?"
    assert "targets.slurm.time" in {path for path, _ in problems}


def test_a_job_loaded_without_the_targets_settings_still_runs_them_checked(job):
    """The trainer and the run folder hold a target's block as plain data; the target reads it typed."""
    assert isinstance(job.spec.targets, dict)
    bad = job.spec.model_copy(update={"targets": {"slurm": {"time": "soon"}}})
    with pytest.raises(ValidationError):
        targets.get("slurm").settings(bad)


def test_submit_address_goes_to_the_target_that_declares_one(job, tunerun):
    assert targets.addresses() == {"ray": "address"}
    quickstart = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "quickstart.yaml"
    refused = tunerun("submit", str(quickstart), "--target", "slurm", "--address", "http://head:8265", cwd=Path.cwd())
    assert refused.returncode == 2 and "--address applies to --target ray only" in refused.stderr


def test_an_unknown_target_is_one_clear_error(job):
    with pytest.raises(TargetError, match="target 'lsf' is not available; available: local, ray, slurm, k8s"):
        targets.get("lsf")
    run = create_run(job, "lsf")  # a run folder written by a tunerun that knew another target
    with pytest.raises(TargetError, match="started by target 'lsf'"):
        targets.for_run(run)


def test_for_run_finds_the_target_its_run_json_names(job):
    run = create_run(job, "slurm")
    assert type(targets.for_run(run)).__name__ == "SlurmTarget"


def test_local_renders_nothing_and_says_what_it_would_start(job):
    with pytest.raises(TargetError, match="-m tunerun.trainer .*/runs/t-1"):
        targets.get("local").render(job)


def test_every_target_starts_the_same_trainer_command(job):
    assert targets.trainer_command(job) == ["python", "-m", "tunerun.trainer", job.run_uri]
    with_endpoint = job.model_copy(update={"spec": job.spec.model_copy(update={
        "storage": job.spec.storage.model_copy(update={"endpoint_url": "http://minio:9000"})})})
    assert targets.trainer_command(with_endpoint, python="/venv/bin/python")[-2:] == ["--endpoint-url",
                                                                                       "http://minio:9000"]


# ── run state ───────────────────────────────────────────────────────────────────────────────────────────────

def test_run_info_round_trips_and_keeps_keys_it_does_not_know(job):
    run = create_run(job, "local")
    info = read_info(run)
    assert info.state == RunState.PENDING and info.target == "local" and info.method == "lora"
    assert info.run_id == "t-1" and info.created_at is not None
    raw = run.read_json("run.json")
    run.write_json("run.json", {**raw, "written_by_a_newer_tunerun": {"x": 1}})
    update_info(run, state=RunState.RUNNING)
    again = run.read_json("run.json")
    assert again["written_by_a_newer_tunerun"] == {"x": 1} and again["state"] == "running"


def test_terminal_states():
    assert [s.value for s in RunState if s.terminal] == ["succeeded", "failed", "cancelled", "preempted"]
    assert f"{RunState.PREEMPTED}" == "preempted"  # as it reads in messages and event names


def test_an_unreadable_run_json_is_a_storage_error(job):
    run = create_run(job, "local")
    run.write_text("run.json", '{"state": "runn')  # cut off by a full disk
    with pytest.raises(StorageError, match="run.json is not a readable run record"):
        read_info(run)
    run.write_json("run.json", {"state": "exploded"})
    with pytest.raises(StorageError, match="run.json is not a readable run record"):
        read_info(run)


def test_an_existing_run_is_only_taken_over_with_resume(job):
    create_run(job, "local")
    with pytest.raises(TargetError, match="run t-1 already exists .* --resume t-1"):
        create_run(job, "local")
    with pytest.raises(TargetError, match="--resume other: no such run"):
        create_run(job.model_copy(update={"run_id": "other"}), "local", resume=True)


def test_cancel_ends_a_run_as_cancelled_unless_it_had_succeeded(job):
    run = create_run(job, "local")
    update_info(run, state=RunState.PREEMPTED)  # what the driver records when SIGTERM stops it at a checkpoint
    record_cancelled(run, "local")
    assert read_info(run).state == RunState.CANCELLED
    update_info(run, state=RunState.SUCCEEDED)
    record_cancelled(run, "local")
    assert read_info(run).state == RunState.SUCCEEDED


def test_the_local_and_ray_targets_tell_the_trainer_how_to_reach_a_store_with_a_private_ca(job):
    """It reads job.yaml before it knows the spec's storage settings (Slurm and Kubernetes: their render tests;
    reading over TLS: tests/e2e/test_s3_tls.py)."""
    from tunerun.cluster.ray_cluster import submission

    storage = job.spec.storage.model_copy(update={"uri": "s3://runs/team", "endpoint_url": "https://s3.corp:9000",
                                                  "ca_bundle": "/etc/corp-ca.pem", "addressing_style": "path"})
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"storage": storage})})
    flags = ["--endpoint-url", "https://s3.corp:9000", "--ca-bundle", "/etc/corp-ca.pem", "--addressing-style", "path"]
    assert targets.trainer_command(job, python="py") == ["py", "-m", "tunerun.trainer", "s3://runs/team/t-1", *flags]
    assert submission(job, environ={})["entrypoint"].endswith(" ".join(flags))


# ── the local target, with a real process as the driver ─────────────────────────────────────────────────────

def test_local_status_of_a_live_driver_is_what_run_json_says(job, sleeper, tmp_path):
    run = local_run(job, sleeper.pid, tmp_path / "driver.log")
    update_info(run, state=RunState.RUNNING)
    assert LocalTarget().status(run).state == RunState.RUNNING


def test_local_status_of_a_driver_gone_without_an_outcome_is_failed(job, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = local_run(job, gone.pid, tmp_path / "driver.log")
    update_info(run, state=RunState.RUNNING)
    info = LocalTarget().status(run)
    assert info.state == RunState.FAILED and "gone without recording an outcome" in info.error
    assert read_info(run).state == RunState.RUNNING  # status reads; it never writes


def test_a_driver_on_another_host_is_judged_by_the_run_folder_alone(job, tmp_path):
    run = local_run(job, 1, tmp_path / "driver.log", host="another-host")  # pid 1 is alive here, not there
    update_info(run, state=RunState.RUNNING)
    assert LocalTarget().status(run).state == RunState.RUNNING
    assert LocalTarget().cancel(run) is False  # never signals a process of this host by another host's pid


def test_local_cancel_stops_the_process_group_and_records_it(job, sleeper, tmp_path):
    run = local_run(job, sleeper.pid, tmp_path / "driver.log")
    started = time.monotonic()
    assert LocalTarget().cancel(run) is True
    assert sleeper.wait(timeout=10) != 0 and time.monotonic() - started < 10  # SIGTERM, no need for SIGKILL
    info = read_info(run)
    assert info.state == RunState.CANCELLED and info.finished_at is not None
    events = [e["event"] for e in run.read_jsonl("events.jsonl")]
    assert events[-2:] == ["cancel_requested", "run_cancelled"]
    assert LocalTarget().cancel(run) is False  # nothing left running


@pytest.fixture
def mlflow_api():
    """A stand-in for an MLflow tracking server's REST API that records every ``runs/update`` it is sent: (url,
    [bodies]). Cancelling a run against a real `mlflow server` is tests/e2e/test_tracking.py; this one is fast."""
    updates: list[dict] = []

    class Api(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            if self.path == "/api/2.0/mlflow/runs/update":
                updates.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", updates
    server.shutdown()
    server.server_close()


def tracked(job, tracking_uri: str):
    """``job`` tracking to the MLflow server at ``tracking_uri``."""
    mlflow = {"tracking_uri": tracking_uri, "check_reachable": False}
    return job.model_copy(update={"spec": job.spec.model_copy(update={
        "tracking": job.spec.tracking.model_copy(update={"mlflow": MlflowSpec(**mlflow)})})})


def test_cancelling_a_tracked_run_ends_its_mlflow_run_killed(job, sleeper, tmp_path, mlflow_api):
    """Whoever cancels (`tunerun cancel`, Ctrl-C in `tunerun run`, the service) goes through `Target.cancel`: the
    driver may be stopped before it can close its MLflow run, so the cancel closes it."""
    tracking_uri, updates = mlflow_api
    run = local_run(tracked(job, tracking_uri), sleeper.pid, tmp_path / "driver.log")
    update_info(run, state=RunState.RUNNING, mlflow_run_id="mlflow-1")
    warnings: list[str] = []
    assert LocalTarget().cancel(run, warn=warnings.append) is True
    assert [(u["run_id"], u["status"]) for u in updates] == [("mlflow-1", "KILLED")] and warnings == []
    assert read_info(run).state == RunState.CANCELLED


def test_a_tracking_server_that_cannot_be_told_is_a_warning_and_the_run_is_cancelled_all_the_same(
        job, sleeper, tmp_path, tunerun, free_port):
    run = local_run(tracked(job, f"http://127.0.0.1:{free_port()}"), sleeper.pid, tmp_path / "driver.log")
    update_info(run, state=RunState.RUNNING, mlflow_run_id="mlflow-1")
    cancelled = tunerun("cancel", "t-1", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert cancelled.returncode == 0 and "cancelled t-1" in cancelled.stdout, cancelled.stderr
    assert "warning MLflow run mlflow-1 not marked KILLED" in cancelled.stderr
    assert read_info(run).state == RunState.CANCELLED
    assert [e["event"] for e in run.read_jsonl("events.jsonl")][-2:] == ["run_cancelled", "mlflow_run_not_killed"]


def test_a_run_that_succeeded_before_the_cancel_keeps_its_mlflow_run(job, sleeper, tmp_path, mlflow_api):
    tracking_uri, updates = mlflow_api
    run = local_run(tracked(job, tracking_uri), sleeper.pid, tmp_path / "driver.log")
    update_info(run, state=RunState.SUCCEEDED, mlflow_run_id="mlflow-1")  # the driver finished as the cancel came
    assert LocalTarget().cancel(run) is True
    assert updates == [] and read_info(run).state == RunState.SUCCEEDED


def test_local_logs_read_the_driver_log_and_follow_until_the_run_ends(job, sleeper, tmp_path):
    log = tmp_path / "driver.log"
    log.write_text("line 1\n")
    run = local_run(job, sleeper.pid, log)
    seen: list[str] = []
    LocalTarget().logs(run, seen.append)
    assert "".join(seen) == "line 1\n"

    def finish_later():
        with log.open("a") as handle:
            handle.write("line 2\n")
        update_info(run, state=RunState.SUCCEEDED)

    seen.clear()
    timer = threading.Timer(1.5, finish_later)
    timer.start()
    LocalTarget().logs(run, seen.append, follow=True)  # returns once the run is terminal
    timer.join()
    assert "".join(seen) == "line 1\nline 2\n"


def test_without_its_log_file_the_copy_in_the_run_folder_is_shown(job, tmp_path):
    run = local_run(job, 1, tmp_path / "absent.log", host="another-host")
    run.write_text("logs/driver.log", "copied at the end\n")
    seen: list[str] = []
    LocalTarget().logs(run, seen.append)
    assert seen == ["copied at the end\n"]


# ── list and status agree, whatever the target ──────────────────────────────────────────────────────────────

def test_list_and_status_report_the_state_the_runs_own_target_sees(job, tmp_path, tunerun):
    """A local run whose driver died without an outcome, and a preempted Slurm run that Slurm has requeued and
    runs again. Slurm's answer comes from a stand-in `squeue` on PATH (the real daemons are in tests/e2e)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    local = local_run(job, gone.pid, tmp_path / "driver.log")
    update_info(local, state=RunState.RUNNING)
    slurm = create_run(job.model_copy(update={"run_id": "s-1"}), "slurm")
    update_info(slurm, state=RunState.PREEMPTED, slurm={"job_id": "4242"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho RUNNING\n")
    (bin_dir / "squeue").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    storage = str(tmp_path / "runs")
    listing = tunerun("list", "--storage", storage, cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:] if line.strip()}
    assert rows == {"t-1": "failed", "s-1": "running"}
    for run_id, state in rows.items():
        shown = tunerun("status", run_id, "--storage", storage, "--json", cwd=tmp_path, env=env)
        assert json.loads(shown.stdout)["state"] == state
    assert "Slurm job 4242: RUNNING" in tunerun("status", "s-1", "--storage", storage, cwd=tmp_path, env=env).stdout


def test_a_claim_is_won_exactly_once_on_a_filesystem(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    run = RunFolder(str(tmp_path / "runs"), "claimed-1")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda n: run.claim("control/launch-1", {"by": n}), range(8)))
    assert won.count(True) == 1 and run.read_json("control/launch-1") == {"by": won.index(True)}


def test_a_finished_run_is_what_run_json_says_without_asking_its_target(job, tmp_path):
    """A page of finished jobs must not cost a target query per job (squeue, a Kubernetes GET); a preempted run
    is still asked, since Slurm may have requeued it."""
    asked = []

    class Watched(LocalTarget):
        def observe(self, info):
            asked.append(str(info.state))
            return super().observe(info)

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = local_run(job, gone.pid, tmp_path / "driver.log")
    for state in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED):
        update_info(run, state=state)
        assert Watched().status(run, ask_finished=False).state == state
        assert Watched().status(run, read_info(run), ask_finished=False) == read_info(run)
    assert asked == []
    update_info(run, state=RunState.PREEMPTED)
    assert Watched().status(run, ask_finished=False).state == RunState.PREEMPTED
    update_info(run, state=RunState.SUCCEEDED)
    Watched().status(run)  # `tunerun status` asks, to show the target's own view
    assert asked == ["preempted", "succeeded"]
