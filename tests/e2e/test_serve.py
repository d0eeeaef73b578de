"""`tunerun serve` for real: the server process on loopback, the official `openai` client, jobs that train.

One server (and its storage) for the module; the jobs run one at a time (``max_concurrent_runs: 1``) on the
embedded local Ray, each a tiny LoRA run of the bundled ticket data. Checked: a job followed to `succeeded`
with events, checkpoints and its result file; projects as walls; a wrong key; a broken upload naming its line;
a long job cancelled; a job whose server is killed and started again mid-training, then paused and resumed,
continuing its step count to the end; a paused job resumed only once its driver has exited (the slow path: the
queued run must not be mistaken for a driver that died).
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from processes import driver_pid, session_pids, stopped
from serve_process import WAIT_S, serve_models, stop_drivers

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "data" / "support_tickets.jsonl"
# support-long's steps (an epoch of the ticket data): well after the step a test sees before it pauses the job (held
# still meanwhile: processes.stopped), at ~0.1 s a step and the status read 4 times a second
LONG = 64
@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir, free_port, tunerun):
    root = tmp_path_factory.mktemp("serve")
    # the catalog names are the template files: support-tiny.yaml, support-long.yaml
    server, keys = serve_models(root, tiny_model_dir, {"support-tiny": 8, "support-long": LONG}, free_port(), tunerun)
    yield root, server, keys
    server.stop()
    stop_drivers(root / "runs")


def client(service, project: str = "acme", key: str | None = None) -> openai.OpenAI:
    root, server, keys = service
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key or keys[project],
                         max_retries=0, timeout=60)


def uploaded(api: openai.OpenAI, path: Path):
    found = api.files.create(file=path.open("rb"), purpose="fine-tune")
    deadline = time.monotonic() + 120
    while found.status == "uploaded" and time.monotonic() < deadline:
        time.sleep(0.5)
        found = api.files.retrieve(found.id)
    return found


def wait_for(api: openai.OpenAI, job_id: str, done, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        if job.status in ("failed", "cancelled") and what not in ("failed", "cancelled"):
            pytest.fail(f"job {job_id} ended {job.status} while waiting for {what}: {job.error}")
        time.sleep(0.25)  # a step takes ~0.1 s: the pause tests act on a step seen early
    pytest.fail(f"job {job_id} did not reach {what} within {WAIT_S} s: {job}")


def assert_continued_to_the_end(api: openai.OpenAI, run: Path, job_id: str, stopped_at: int) -> None:
    """A resumed job of support-long trains on from its checkpoint to its last step: no step twice, none skipped."""
    done = wait_for(api, job_id, lambda j: j.status == "succeeded", "succeeded")
    assert done.tunerun["step"] == LONG
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100).data]
    assert f"Fine-tuning started: {LONG} steps on 2 workers, from step {stopped_at}" in messages
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, LONG + 1))


@pytest.fixture(scope="module")
def finished(service):
    api = client(service)
    training_file = uploaded(api, TICKETS)
    assert training_file.status == "processed", training_file.status_details
    job = api.fine_tuning.jobs.create(model="support-tiny", training_file=training_file.id, suffix="tickets",
                                      metadata={"ticket": "OPS-7"})
    assert job.status in ("queued", "validating_files", "running")
    return api, wait_for(api, job.id, lambda j: j.status == "succeeded", "succeeded"), training_file


@pytest.mark.slow
def test_a_job_is_followed_to_succeeded_with_events_checkpoints_and_results(finished, service):
    api, job, training_file = finished
    root = service[0]
    assert job.fine_tuned_model == f"ft:support-tiny:acme:tickets:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.metadata == {"ticket": "OPS-7"} and job.training_file == training_file.id
    messages = [e.message for e in reversed(api.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert messages[0] == "Job queued: waiting for a free slot"
    assert any(m.startswith("Files validated:") for m in messages)
    assert any(m.startswith("Fine-tuning started: 8 steps on 2 workers") for m in messages)
    assert any(m.startswith("Step 8/8: training loss=") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 4]
    assert all(c.metrics.train_loss > 0 and c.metrics.valid_loss > 0 for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-8")
    rows = list(csv.DictReader(io.StringIO(api.files.content(job.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and float(rows[-1]["train_loss"]) > 0
    assert job.fine_tuned_model in [m.id for m in api.models.list().data]
    # a job is a run: the CLI reads the same run folder
    status = subprocess.run([sys.executable, "-m", "tunerun.jobs.cli", "status", job.id, "--storage", "runs"],
                            cwd=root, capture_output=True, text=True, timeout=60)
    assert "state succeeded" in status.stdout and "step 8/8" in status.stdout, status.stderr
    record = json.loads((root / "runs" / job.id / "service.json").read_text())
    assert record["project"] == "acme" and record["request"]["suffix"] == "tickets"


@pytest.mark.slow
def test_projects_are_walls_and_a_wrong_key_is_refused(finished, service):
    api, job, training_file = finished
    other = client(service, "globex")
    for call in (lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.files.retrieve(training_file.id),
                 lambda: other.files.content(job.result_files[0]), lambda: other.models.retrieve(job.fine_tuned_model)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.fine_tuning.jobs.list().data == [] and other.files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        client(service, key="tr-123456789abc-" + "A" * 43).fine_tuning.jobs.list()
    log = (service[0] / "server.log").read_text()
    assert not any(key in log for key in service[2].values())  # nothing logs a key


@pytest.mark.slow
def test_an_upload_with_a_broken_line_fails_naming_it(service, tmp_path):
    good = TICKETS.read_text().splitlines()[:20]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(good[:7] + ['{"messages": [{"role": "user", "content": "unterminated'] + good[7:])
                      + "\n")
    found = uploaded(client(service), broken)
    assert found.status == "error" and "line 8" in found.status_details, found


@pytest.mark.slow
def test_a_long_job_is_cancelled(finished, service):
    api, _, training_file = finished
    job = api.fine_tuning.jobs.create(model="support-tiny", training_file=training_file.id,
                                      hyperparameters={"n_epochs": 30})
    wait_for(api, job.id, lambda j: (j.tunerun or {}).get("step"), "a first step")
    assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert session_pids(driver_pid(service[0] / "runs" / job.id)) == []  # the driver and its Ray workers are gone
    assert api.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


@pytest.mark.slow
def test_a_server_killed_mid_job_then_pause_and_resume_continue_the_steps(finished, service):
    api, _, training_file = finished
    root, server, _ = service
    job = api.fine_tuning.jobs.create(model="support-long", training_file=training_file.id)
    wait_for(api, job.id, lambda j: ((j.tunerun or {}).get("step") or 0) >= 2, "step 2")
    session = driver_pid(root / "runs" / job.id)
    # held still from before the kill until it is asked to pause: a step takes ~0.1 s, and a fast machine trained
    # every step while the server was away, so the pause found the job done
    with stopped(session):
        server.kill()
        time.sleep(2)
        assert session_pids(session), "the job's driver died with its server"  # it is detached
        server.start()
        seen = wait_for(api, job.id, lambda j: j.status == "running", "running again")
        assert seen.tunerun["step"] >= 2
        paused = api.fine_tuning.jobs.pause(job.id)
        assert paused.status in ("running", "paused")
    paused = wait_for(api, job.id, lambda j: j.status == "paused", "paused")
    stopped_at = paused.tunerun["step"]
    assert 2 <= stopped_at < LONG and stopped_at in [c.step_number for c in
                                                    api.fine_tuning.jobs.checkpoints.list(job.id).data]
    api.fine_tuning.jobs.resume(job.id)
    assert_continued_to_the_end(api, root / "runs" / job.id, job.id, stopped_at)


@pytest.mark.slow
def test_a_job_resumed_after_its_paused_driver_exited_continues_the_steps(service):
    api = client(service)
    root = service[0]
    training_file = uploaded(api, TICKETS)
    job = api.fine_tuning.jobs.create(model="support-long", training_file=training_file.id)
    wait_for(api, job.id, lambda j: ((j.tunerun or {}).get("step") or 0) >= 2, "step 2")
    pid = driver_pid(root / "runs" / job.id)
    with stopped(pid):  # so that the pause finds it running on a machine of any speed
        api.fine_tuning.jobs.pause(job.id)
    stopped_at = wait_for(api, job.id, lambda j: j.status == "paused", "paused").tunerun["step"]
    deadline = time.monotonic() + WAIT_S
    while session_pids(pid) and time.monotonic() < deadline:  # the driver shuts its Ray down, then exits
        time.sleep(1.0)
    assert session_pids(pid) == [], f"the paused driver (pid {pid}) and its session did not exit"
    api.fine_tuning.jobs.resume(job.id)
    assert_continued_to_the_end(api, root / "runs" / job.id, job.id, stopped_at)
